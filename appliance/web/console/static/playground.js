// The playground's model picker: the sentence under the form tells the size, steps and
// price of the model chosen, and only the LoRA adapters that fit it can be picked.
// Without this script the sentence tells the default model's, and the server refuses
// an adapter that does not fit.
"use strict";

(function () {
  var picker = document.querySelector("[data-model-picker]");
  var facts = document.querySelector("[data-model-facts]");
  if (!picker || !facts) {
    return;
  }
  var loras = document.querySelector("[data-lora-picker]");

  function chosen() {
    var option = picker.options[picker.selectedIndex];
    if (!option) {
      return;
    }
    ["size", "steps", "price"].forEach(function (field) {
      var element = facts.querySelector("[data-field='" + field + "']");
      if (element) {
        element.textContent = option.getAttribute("data-" + field);
      }
    });
    if (!loras) {
      return;
    }
    Array.prototype.forEach.call(loras.options, function (lora) {
      var fits = lora.value === "" ||
        lora.getAttribute("data-base-models").split(" ").indexOf(option.value) >= 0;
      lora.disabled = !fits;
      if (!fits && lora.selected) {
        loras.value = "";
      }
    });
  }

  picker.addEventListener("change", chosen);
  chosen();
})();
