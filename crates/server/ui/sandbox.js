// One sandbox: its state (polled), the lifecycle buttons (suspend, resume, snapshot, fork,
// delete), a terminal on the shell WebSocket (xterm.js), a file browser with upload and
// download, and its egress log.

import { call, groupPath, sandboxPath, shellSocket } from "./api.js";
import { age, badge, bytes, fill, h, labelsText, poll, status } from "./dom.js";
import { egressSection, table } from "./views.js";
import { Terminal } from "./vendor/xterm/xterm.mjs";

const section = (title, ...children) =>
  h("section", { class: "card", "aria-label": title }, h("h2", {}, title), ...children);

export function sandboxView(main, group, id) {
  const base = sandboxPath(group, id);
  const facts = h("div", {}, h("p", {}, "Loading…"));
  const msg = h("p", { role: "status", class: "status", id: "action-status" });
  const terminal = terminalPanel(group, id);
  const files = filesPanel(base);
  const egress = egressSection(group, id);

  const act = async (label, fn) => {
    status(msg, `${label}…`);
    try {
      status(msg, (await fn()) ?? `${label}: done.`, "ok");
    } catch (e) {
      status(msg, `${label} failed: ${e.message}`, "error");
    }
    await refresh();
  };
  const snapName = h("input", { id: "snapshot-name", placeholder: "after-setup", size: 14 });
  const forkCount = h("input", { id: "fork-count", type: "number", min: 1, max: 16, value: 3, size: 3 });
  let armed = null;
  const del = h("button", { type: "button", class: "danger", id: "delete" }, "Delete");
  del.addEventListener("click", () => {
    // Two presses: a deleted sandbox cannot come back, and a dialog box would trap focus.
    if (!armed) {
      del.textContent = "Press again to delete";
      armed = setTimeout(() => {
        armed = null;
        del.textContent = "Delete";
      }, 5000);
      return;
    }
    clearTimeout(armed);
    act("Delete", async () => {
      terminal.close();
      await call("DELETE", base);
      location.hash = `#/groups/${encodeURIComponent(group)}`;
    });
  });
  const toolbar = h(
    "div",
    { class: "toolbar", role: "group", "aria-label": "Sandbox actions" },
    h(
      "button",
      {
        type: "button",
        onclick: () =>
          act("Suspend", async () => {
            // An open shell holds the sandbox: a suspend would wait for it to end.
            terminal.close("Closed: the sandbox was suspended.");
            await call("POST", `${base}/suspend`);
            return "Suspended.";
          }),
      },
      "Suspend",
    ),
    h("button", { type: "button", onclick: () => act("Resume", async () => (await call("POST", `${base}/resume`), "Resumed.")) }, "Resume"),
    h("span", { class: "sep" }),
    h("label", { for: "snapshot-name" }, "Snapshot name"),
    snapName,
    h(
      "button",
      {
        type: "button",
        onclick: () =>
          act("Snapshot", async () => {
            const s = await call("POST", `${base}/snapshots`, { json: { name: snapName.value.trim() } });
            return `Snapshot ${s.name} saved (${bytes(s.size_bytes)}).`;
          }),
      },
      "Snapshot",
    ),
    h("span", { class: "sep" }),
    h("label", { for: "fork-count" }, "Forks"),
    forkCount,
    h(
      "button",
      {
        type: "button",
        onclick: () =>
          act("Fork", async () => {
            // A fork is a snapshot and N sandboxes restored from it (docs/API.md).
            const name = `fork-${Date.now().toString(36)}`;
            await call("POST", `${base}/snapshots`, { json: { name } });
            const r = await call("POST", `${groupPath(group)}/sandboxes`, {
              json: { from_snapshot: name, count: Number(forkCount.value) },
            });
            return `Forked from snapshot ${name}: ${r.sandboxes.map((s) => s.id).join(", ")}.`;
          }),
      },
      "Fork",
    ),
    h("span", { class: "sep" }),
    del,
  );

  fill(
    main,
    h(
      "p",
      { class: "crumbs" },
      h("a", { href: "#/groups" }, "Groups"),
      " / ",
      h("a", { href: `#/groups/${encodeURIComponent(group)}` }, group),
      " / ",
      id,
    ),
    h("h1", {}, `Sandbox ${id}`),
    section("State", facts, toolbar, msg),
    terminal.el,
    files.el,
    egress.el,
  );

  async function refresh() {
    try {
      const sb = await call("GET", base);
      fill(
        facts,
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "State"),
          h("dd", { id: "sandbox-state" }, badge(sb.state), sb.reason ? ` ${sb.reason}` : ""),
          h("dt", {}, "Tier"),
          h("dd", {}, sb.tier),
          h("dt", {}, "Node"),
          h("dd", { id: "sandbox-node" }, sb.node ?? "none"),
          h("dt", {}, "Age"),
          h("dd", { title: sb.created_at }, age(sb.created_at)),
          h("dt", {}, "Labels"),
          h("dd", {}, labelsText(sb.labels) || "none"),
          h("dt", {}, "Image"),
          h("dd", { class: "mono" }, sb.image),
        ),
      );
    } catch (e) {
      fill(facts, h("p", { role: "alert", class: "status status-error" }, e.message));
    }
  }

  const stops = [poll(refresh, 2000), poll(egress.refresh, 3000)];
  // Listing files uses the VM, which would resume a suspended sandbox: only a running one is
  // listed by itself, a suspended one when the user opens a directory.
  call("GET", base)
    .then((sb) => (sb.state === "running" ? files.list() : files.idle(sb.state)))
    .catch(() => {});
  return () => {
    stops.forEach((s) => s());
    terminal.close();
  };
}

/** The terminal: closed until asked for, since a shell holds the sandbox awake. */
function terminalPanel(group, id) {
  const COLS = 100;
  const ROWS = 26;
  const screen = h("div", { class: "terminal", id: "terminal" });
  const msg = h("p", { role: "status", class: "status", id: "terminal-status" });
  let term = null;
  let ws = null;
  const open = h("button", { type: "button", class: "primary", id: "terminal-open" }, "Open terminal");
  const closeBtn = h("button", { type: "button", id: "terminal-close", disabled: true }, "Close terminal");

  function close(why = "Closed.") {
    if (ws) status(msg, why);
    if (ws && ws.readyState <= WebSocket.OPEN) ws.close(1000);
    ws = null;
    term?.dispose();
    term = null;
    screen.replaceChildren();
    open.disabled = false;
    closeBtn.disabled = true;
  }

  open.addEventListener("click", () => {
    close();
    term = new Terminal({
      cols: COLS,
      rows: ROWS,
      fontSize: 14,
      fontFamily: "ui-monospace, 'DejaVu Sans Mono', Menlo, monospace",
      cursorBlink: true,
      theme: { background: "#15181d", foreground: "#e6e6e6" },
    });
    term.open(screen);
    // The terminal takes every key, Tab included; Ctrl+] gives the focus back to the page.
    term.attachCustomKeyEventHandler((e) => {
      if (e.type === "keydown" && e.ctrlKey && e.key === "]") {
        closeBtn.focus();
        return false;
      }
      return true;
    });
    const encoder = new TextEncoder();
    const socket = shellSocket(group, id, COLS, ROWS);
    ws = socket;
    status(msg, "Connecting…");
    socket.onopen = () => status(msg, "Connected. Ctrl+] moves the focus out of the terminal.", "ok");
    socket.onmessage = (ev) => {
      if (typeof ev.data === "string") {
        const m = JSON.parse(ev.data);
        if (m.type === "exit") {
          term?.write(`\r\n[exited with code ${m.exit_code}${m.signal ? `, signal ${m.signal}` : ""}]\r\n`);
        }
      } else {
        term?.write(new Uint8Array(ev.data));
      }
    };
    socket.onclose = (ev) => {
      if (ws === socket) status(msg, `Disconnected${ev.reason ? `: ${ev.reason}` : ""}.`, ev.code === 1000 ? "info" : "error");
      if (ws === socket) closeBtn.disabled = true;
    };
    socket.onerror = () => status(msg, "The shell could not connect (is the sandbox running, and may this key use it?).", "error");
    // Input is binary: text messages are the protocol's control channel.
    term.onData((d) => socket.readyState === WebSocket.OPEN && socket.send(encoder.encode(d)));
    term.onBinary((d) => socket.readyState === WebSocket.OPEN && socket.send(Uint8Array.from(d, (c) => c.charCodeAt(0))));
    open.disabled = true;
    closeBtn.disabled = false;
    term.focus();
  });
  closeBtn.addEventListener("click", () => {
    close();
    open.focus();
  });
  const el = section("Terminal", h("div", { class: "toolbar" }, open, closeBtn), msg, screen);
  return { el, close };
}

/** A directory listing with navigation, upload, download and delete. */
function filesPanel(base) {
  const path = h("input", { id: "files-path", value: "/root", size: 40, spellcheck: "false" });
  const listing = h("div", {});
  const msg = h("p", { role: "status", class: "status", id: "files-status" });
  const upload = h("input", { id: "upload-file", type: "file", multiple: true });
  const join = (dir, name) => `${dir.replace(/\/+$/, "")}/${name}`;

  async function list(to) {
    if (to !== undefined) path.value = to;
    try {
      const r = await call("GET", `${base}/files/list`, { query: { path: path.value } });
      path.value = r.path;
      // Directories first, then by name.
      const entries = [...r.entries].sort((a, b) => (b.kind === "dir") - (a.kind === "dir") || a.name.localeCompare(b.name));
      fill(
        listing,
        table(
          `Files in ${r.path}`,
          ["Name", "Kind", "Size", "Mode", "Modified", "Actions"],
          entries.map((e) => {
            const full = join(r.path, e.name);
            return [
              e.kind === "dir"
                ? h("button", { type: "button", class: "link", onclick: () => list(full) }, `${e.name}/`)
                : e.name,
              e.kind,
              e.kind === "file" ? bytes(e.size) : "",
              e.mode,
              e.mtime.replace("T", " "),
              h(
                "span",
                { class: "row-actions" },
                e.kind === "file"
                  ? h("button", { type: "button", "aria-label": `Download ${e.name}`, onclick: () => download(full, e.name) }, "Download")
                  : null,
                h("button", { type: "button", class: "danger", "aria-label": `Delete ${e.name}`, onclick: () => remove(full, e.kind) }, "Delete"),
              ),
            ];
          }),
          "This directory is empty.",
        ),
      );
    } catch (e) {
      fill(listing, h("p", { class: "status status-error" }, e.message));
    }
  }

  async function download(full, name) {
    try {
      const r = await call("GET", `${base}/files`, { query: { path: full }, raw: true });
      const url = URL.createObjectURL(await r.blob());
      const a = h("a", { href: url, download: name, hidden: true });
      document.body.append(a);
      a.click();
      a.remove();
      setTimeout(() => URL.revokeObjectURL(url), 60000);
      status(msg, `Downloaded ${full}.`, "ok");
    } catch (e) {
      status(msg, `Download failed: ${e.message}`, "error");
    }
  }

  async function remove(full, kind) {
    try {
      await call("DELETE", `${base}/files`, { query: { path: full, recursive: kind === "dir" ? "true" : undefined } });
      status(msg, `Deleted ${full}.`, "ok");
    } catch (e) {
      status(msg, `Delete failed: ${e.message}`, "error");
    }
    await list();
  }

  async function send() {
    if (!upload.files.length) {
      status(msg, "Choose a file to upload first.", "error");
      return;
    }
    for (const f of upload.files) {
      const to = join(path.value, f.name);
      status(msg, `Uploading ${f.name}…`);
      try {
        await call("PUT", `${base}/files`, { query: { path: to }, body: f });
        status(msg, `Uploaded ${to} (${bytes(f.size)}).`, "ok");
      } catch (e) {
        status(msg, `Upload of ${f.name} failed: ${e.message}`, "error");
        return;
      }
    }
    upload.value = "";
    await list();
  }

  const el = section(
    "Files",
    h(
      "form",
      {
        class: "toolbar",
        onsubmit: (e) => {
          e.preventDefault();
          list();
        },
      },
      h("label", { for: "files-path" }, "Directory"),
      path,
      h("button", { type: "submit" }, "Open"),
      h("button", { type: "button", onclick: () => list(path.value.replace(/\/[^/]*\/?$/, "") || "/") }, "Up"),
    ),
    h(
      "div",
      { class: "toolbar" },
      h("label", { for: "upload-file" }, "Upload into this directory"),
      upload,
      h("button", { type: "button", id: "upload", onclick: send }, "Upload"),
    ),
    msg,
    listing,
  );
  const idle = (state) =>
    fill(listing, h("p", { class: "empty" }, `The sandbox is ${state}: opening a directory resumes it.`));
  return { el, list, idle };
}
