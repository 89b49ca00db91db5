// The console's own script: the narrow-screen menu, opening forms in place, the copy
// button and live job progress. Every page also works without it (the nav wraps,
// forms open through their #anchor, progress pages refresh themselves).
"use strict";

(function () {
  var POLL_MS = 1000;

  function legacyCopy(field) {
    field.focus();
    field.select();
    try {
      return document.execCommand("copy");
    } catch (error) {
      return false;
    }
  }

  function copyFrom(button) {
    var field = document.getElementById(button.getAttribute("data-copy"));
    if (!field) {
      return;
    }
    var label = button.textContent;
    var done = function () {
      button.textContent = "Copied";
      button.classList.add("copied");
      setTimeout(function () {
        button.textContent = label;
        button.classList.remove("copied");
      }, 2500);
    };
    // The clipboard API needs a secure context (HTTPS or this machine);
    // an appliance reached over plain HTTP on the LAN falls back to selection.
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(field.value).then(done, function () {
        if (legacyCopy(field)) { done(); }
      });
    } else if (legacyCopy(field)) {
      done();
    }
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (button) {
      event.preventDefault();
      copyFrom(button);
    }
  });

  // A link that opens a form on the page (the form shows itself on :target without
  // script): only ever opens it, and puts the cursor in its first field.
  document.addEventListener("click", function (event) {
    var opener = event.target.closest("[data-opens]");
    var form = opener && document.getElementById(opener.getAttribute("data-opens"));
    if (!form) {
      return;
    }
    event.preventDefault();
    form.classList.add("open");
    var field = form.querySelector("input:not([type=hidden]), textarea, select");
    if (field) {
      field.focus();
    }
  });

  function setMenu(toggle, nav, open) {
    toggle.setAttribute("aria-expanded", open ? "true" : "false");
    nav.classList.toggle("open", open);
  }

  // At narrow widths the top bar's links fold behind a menu button (console.css
  // hides it elsewhere); without this script they wrap instead.
  function menu() {
    var toggle = document.querySelector(".menu-toggle");
    var nav = toggle && document.getElementById(toggle.getAttribute("aria-controls"));
    if (!nav) {
      return;
    }
    toggle.closest(".topbar").classList.add("has-menu");
    toggle.addEventListener("click", function () {
      setMenu(toggle, nav, toggle.getAttribute("aria-expanded") !== "true");
    });
    document.addEventListener("keydown", function (event) {
      if (event.key === "Escape" && toggle.getAttribute("aria-expanded") === "true") {
        setMenu(toggle, nav, false);
        toggle.focus();
      }
    });
  }

  function setText(root, field, text) {
    var node = root.querySelector('[data-field="' + field + '"]');
    if (node && node.textContent !== text) {
      node.textContent = text;
    }
    return node;
  }

  function link(href, text, download) {
    var a = document.createElement("a");
    a.href = href;
    a.textContent = text;
    if (download) {
      a.setAttribute("download", "");
    }
    return a;
  }

  function showImage(figure, image) {
    var frame = figure.querySelector(".frame");
    var prompt = figure.querySelector(".prompt");
    if (image.status === "completed" && !frame.querySelector("img")) {
      var img = document.createElement("img");
      img.src = image.url;
      img.alt = prompt ? prompt.textContent : "";
      var a = link(image.url, "", false);
      a.textContent = "";
      a.appendChild(img);
      frame.replaceChildren(a);
      var links = figure.querySelector('[data-field="links"]');
      if (links) {
        links.replaceChildren(link(image.url, "Full size"), document.createTextNode(" · "),
                              link(image.url + "?download=true", "Download", true));
      }
    } else if (image.status !== "completed") {
      setText(figure, "image-status", image.status + (image.error ? ": " + image.error : ""));
    }
    figure.className = figure.className.replace(/status-\w+/, "status-" + image.status);
    figure.setAttribute("data-status", image.status);
  }

  function update(widget, job) {
    var bar = widget.querySelector("progress");
    if (bar) {
      bar.value = job.completedImages;
    }
    setText(widget, "count", job.completedImages + " / " + job.totalImages);
    var badge = setText(widget, "status", job.status);
    if (badge) {
      badge.className = "badge status-" + job.status;
    }
    var page = document.querySelector("[data-job-images]");
    if (page) {
      job.images.forEach(function (image) {
        var figure = page.querySelector('[data-image-index="' + image.index + '"]');
        if (figure && figure.getAttribute("data-status") !== image.status) {
          showImage(figure, image);
        }
      });
    }
  }

  function watch(widget) {
    var url = widget.getAttribute("data-progress-url");
    var timer = null;
    var poll = function () {
      fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" })
        .then(function (response) {
          if (response.status === 401) {
            // Signed out meanwhile: the reload leads to the sign-in page.
            window.location.reload();
            return null;
          }
          return response.ok ? response.json() : null;
        })
        .then(function (job) {
          if (!job) {
            return;
          }
          update(widget, job);
          if (job.finished) {
            clearInterval(timer);
            if (widget.hasAttribute("data-reload-when-done")) {
              window.location.reload();
            } else {
              var finished = document.querySelector('[data-field="finished"]');
              if (finished && finished.textContent === "—") {
                finished.textContent = "just now";
              }
            }
          }
        })
        .catch(function () { /* a missed poll is retried on the next tick */ });
    };
    timer = setInterval(poll, POLL_MS);
    poll();
  }

  document.addEventListener("DOMContentLoaded", function () {
    menu();
    document.querySelectorAll("[data-progress-url]").forEach(watch);
  });
})();
