// The book's fixes of the theme's behaviour, found by tests/test_browser.py (loaded on every
// page by _ext/bnkit_book.py).
document.addEventListener("DOMContentLoaded", () => {
  // pydata-sphinx-theme (the modal sidebars below 992 px) and sphinx-book-theme (collapsing
  // the sidebar above) bind their handlers to the page's first .primary-toggle and
  // .secondary-toggle only, a hidden one: the visible buttons did nothing. Each of them now
  // clicks the bound one.
  for (const selector of [".primary-toggle", ".secondary-toggle"]) {
    const [bound, ...others] = document.querySelectorAll(selector);
    for (const button of others) {
      button.setAttribute("aria-haspopup", "dialog");
      button.addEventListener("click", (event) => {
        event.preventDefault();
        event.stopPropagation();
        bound.click();
      });
    }
  }

  // The colour-mode switch says which mode it is in (its icons are hidden from screen readers).
  const root = document.documentElement;
  const name = () => {
    for (const button of document.querySelectorAll(".theme-switch-button")) {
      button.setAttribute("aria-label", `Color mode: ${root.dataset.mode || "auto"}`);
    }
  };
  name();
  new MutationObserver(name).observe(root, { attributes: true, attributeFilter: ["data-mode"] });
});
