// The large view of the gallery's and the job page's images: a <dialog> with the image,
// its prompt and settings, and a download link. Without this script each thumbnail is
// a plain link (to the image's job, or to the image itself).
"use strict";

(function () {
  var dialog = null;
  var current = -1;
  var shown = [];

  function thumbLink(item) {
    // The job page's script adds the link of an image made while the page is open.
    return item.querySelector("a.thumb, .frame a");
  }

  function openable() {
    return Array.prototype.filter.call(
      document.querySelectorAll("[data-lightbox] [data-lightbox-item]"),
      function (item) {
        var link = thumbLink(item);
        return link && link.querySelector("img") && item.querySelector("[data-lightbox-facts]");
      });
  }

  function show(index) {
    var item = shown[index];
    var link = thumbLink(item);
    var facts = item.querySelector("[data-lightbox-facts]").cloneNode(true);
    facts.hidden = false;
    var prompt = facts.querySelector('[data-field="prompt"]');
    var img = dialog.querySelector("[data-lightbox-picture] img");
    if (!img) {
      img = document.createElement("img");
      dialog.querySelector("[data-lightbox-picture]").appendChild(img);
    }
    img.src = link.getAttribute("data-full") || link.getAttribute("href");
    img.alt = prompt ? prompt.textContent : "";
    dialog.querySelector(".lightbox-title").textContent =
      "Image " + (index + 1) + " of " + shown.length;
    dialog.querySelector("[data-lightbox-details]").replaceChildren(facts);
    dialog.querySelector('[data-lightbox-step="-1"]').disabled = index === 0;
    dialog.querySelector('[data-lightbox-step="1"]').disabled = index === shown.length - 1;
    // A button just disabled drops the focus, and with it the arrow keys.
    if (dialog.open && (!dialog.contains(document.activeElement) ||
                        document.activeElement.disabled)) {
      dialog.querySelector("[data-lightbox-close]").focus();
    }
    current = index;
  }

  function open(item) {
    shown = openable();
    var index = shown.indexOf(item);
    if (index < 0) {
      return false;
    }
    show(index);
    if (!dialog.open) {
      dialog.showModal();
    }
    return true;
  }

  function step(by) {
    var next = current + by;
    if (dialog.open && next >= 0 && next < shown.length) {
      show(next);
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    dialog = document.querySelector("[data-lightbox-dialog]");
    if (!dialog || typeof dialog.showModal !== "function") {
      return;  // the links still lead to the image
    }
    document.addEventListener("click", function (event) {
      var link = event.target.closest("[data-lightbox-item] a.thumb, [data-lightbox-item] .frame a");
      // A new tab or window asked for with a modifier key gets the plain link.
      if (!link || event.button !== 0 || event.metaKey || event.ctrlKey || event.shiftKey ||
          event.altKey) {
        return;
      }
      if (open(link.closest("[data-lightbox-item]"))) {
        event.preventDefault();
      }
    });
    dialog.addEventListener("click", function (event) {
      var stepper = event.target.closest("[data-lightbox-step]");
      if (stepper) {
        step(Number(stepper.getAttribute("data-lightbox-step")));
      } else if (event.target.closest("[data-lightbox-close]") || event.target === dialog) {
        dialog.close();  // the close button, or a click on the backdrop
      }
    });
    document.addEventListener("keydown", function (event) {
      if (!dialog.open) {
        return;
      }
      if (event.key === "ArrowLeft") {
        event.preventDefault();
        step(-1);
      } else if (event.key === "ArrowRight") {
        event.preventDefault();
        step(1);
      }
      // Escape closes a modal dialog by itself.
    });
    dialog.addEventListener("close", function () {
      // Back to the thumbnail of the image last shown, which may not be the one clicked.
      var item = shown[current];
      var link = item && thumbLink(item);
      if (link) {
        link.focus();
      }
    });
  });
})();
