// The console's entry point: sign-in, the hash router (#/groups, #/groups/G,
// #/groups/G/sandboxes/ID, #/nodes, #/metrics) and the page frame. Each view draws into <main> and
// returns a function that stops what it started (polling, a terminal's socket).

import { apiKey, call, clearApiKey, setApiKey } from "./api.js";
import { h, fill, status } from "./dom.js";
import { groupsView, groupView } from "./views.js";
import { sandboxView } from "./sandbox.js";
import { metricsView } from "./charts.js";
import { nodesView } from "./nodes.js";

const main = document.getElementById("main");
const nav = document.getElementById("nav");
let stop = () => {};

function signInView(why) {
  const input = h("input", {
    id: "api-key",
    name: "api-key",
    type: "password",
    autocomplete: "off",
    spellcheck: "false",
    required: true,
    placeholder: "moat_…",
    "aria-describedby": "api-key-help",
  });
  const msg = h("p", { role: "alert", class: "status" });
  if (why) status(msg, why, "error");
  const form = h(
    "form",
    {
      class: "card signin",
      onsubmit: async (e) => {
        e.preventDefault();
        setApiKey(input.value.trim());
        try {
          await call("GET", "/v1/sandbox-groups");
          location.hash = "#/groups";
          route();
        } catch (err) {
          clearApiKey();
          status(msg, `Sign-in failed: ${err.message}`, "error");
        }
      },
    },
    h("h1", {}, "Sign in"),
    h("label", { for: "api-key" }, "API key"),
    input,
    h(
      "p",
      { id: "api-key-help", class: "help" },
      "The key is kept in this tab only (sessionStorage) and sent as the API's Authorization header.",
    ),
    h("button", { type: "submit", class: "primary" }, "Sign in"),
    msg,
  );
  fill(main, form);
  input.focus();
  return () => {};
}

function route() {
  stop();
  const signedIn = Boolean(apiKey());
  nav.hidden = !signedIn;
  if (!signedIn) {
    stop = signInView();
    return;
  }
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  for (const a of nav.querySelectorAll("a")) {
    a.toggleAttribute("aria-current", location.hash.startsWith(a.getAttribute("href")));
  }
  if (parts[0] === "groups" && parts[1] && parts[2] === "sandboxes" && parts[3]) {
    stop = sandboxView(main, parts[1], parts[3]);
  } else if (parts[0] === "groups" && parts[1]) {
    stop = groupView(main, parts[1]);
  } else if (parts[0] === "nodes") {
    stop = nodesView(main);
  } else if (parts[0] === "metrics") {
    stop = metricsView(main);
  } else {
    stop = groupsView(main);
  }
  main.focus({ preventScroll: true });
}

document.getElementById("sign-out").addEventListener("click", () => {
  clearApiKey();
  location.hash = "#/";
  route();
});
window.addEventListener("moat:signed-out", (e) => {
  // A wrong key typed into the sign-in form is that form's own error, not a sign-out.
  if (nav.hidden) return;
  stop();
  nav.hidden = true;
  stop = signInView(`Signed out: ${e.detail}`);
});
window.addEventListener("hashchange", route);
route();
