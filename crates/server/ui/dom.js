// Building DOM without innerHTML: every string from the API becomes a text node, so nothing a
// sandbox or a label holds can turn into markup or script.

/**
 * `h("button", {type: "button", onclick: f}, "Suspend")`: an element with attributes (`on…`
 * functions become listeners; false/null/undefined are left out) and children (strings,
 * nodes, arrays, null).
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === false || v === null || v === undefined) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children) {
    if (c === null || c === undefined || c === false) continue;
    if (Array.isArray(c)) append(el, c);
    else el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

/** Replaces an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/** "3 min", "2 h", "5 d": how long ago an RFC 3339 time was. */
export function age(iso) {
  const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000);
  if (s < 60) return `${Math.floor(s)} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min`;
  if (s < 86400) return `${Math.floor(s / 3600)} h`;
  return `${Math.floor(s / 86400)} d`;
}

export function bytes(n) {
  if (n < 1024) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let v = n;
  let u = -1;
  while (v >= 1024 && u < units.length - 1) {
    v /= 1024;
    u++;
  }
  return `${v.toFixed(v < 10 ? 1 : 0)} ${units[u]}`;
}

export const labelsText = (labels) =>
  Object.entries(labels || {})
    .map(([k, v]) => `${k}=${v}`)
    .join(", ");

/** A state or verdict as a coloured badge (the word itself carries the meaning). */
export const badge = (word) => h("span", { class: `badge badge-${word}` }, word);

/** A region that announces its text to screen readers: errors and results of actions. */
export function status(el, text, kind = "info") {
  el.className = `status status-${kind}`;
  el.textContent = text;
}

/** Runs `every` now and then every `ms` until the returned stop function is called. */
export function poll(every, ms) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    try {
      await every();
    } catch (e) {
      // Each view shows its own errors; one failed round must not stop the next.
      console.error(e);
    } finally {
      if (!stopped) timer = setTimeout(tick, ms);
    }
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}
