// The group views: the list of groups, and one group with its spec, pool, policy, sandboxes,
// snapshots, egress log and policy decisions. Lists refresh by polling the API.

import { call, groupPath } from "./api.js";
import { age, badge, fill, h, labelsText, poll, status } from "./dom.js";

const groupLink = (g) => h("a", { href: `#/groups/${encodeURIComponent(g)}` }, g);
const sandboxLink = (g, id) =>
  h("a", { href: `#/groups/${encodeURIComponent(g)}/sandboxes/${encodeURIComponent(id)}` }, id);

/** A table with a caption and a header row; `rows` are arrays of cells. */
export function table(caption, heads, rows, empty = "None.") {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "table",
    {},
    h("caption", { class: "sr-only" }, caption),
    h("thead", {}, h("tr", {}, heads.map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))),
  );
}

const section = (title, ...children) =>
  h("section", { class: "card", "aria-label": title }, h("h2", {}, title), ...children);

export function groupsView(main) {
  const body = h("div", {}, h("p", {}, "Loading…"));
  fill(main, h("h1", {}, "Sandbox groups"), body);
  return poll(async () => {
    try {
      const { groups } = await call("GET", "/v1/sandbox-groups");
      fill(
        body,
        table(
          "Sandbox groups",
          ["Group", "Image", "Tier", "Warm pool (ready / size)", "Egress default", "Labels", "Updated"],
          groups.map((g) => [
            groupLink(g.name),
            g.spec.image,
            g.spec.tier,
            `${g.status.pool_ready} / ${g.spec.pool.size}`,
            g.spec.egress.default,
            labelsText(g.spec.labels),
            `${age(g.updated_at)} ago`,
          ]),
          "No groups yet: create one with `moat group apply --name NAME`.",
        ),
      );
    } catch (e) {
      fill(body, h("p", { role: "alert", class: "status status-error" }, e.message));
    }
  }, 3000);
}

/** The egress log of a group, or of one sandbox: newest last, refreshed by the caller. */
export function egressSection(group, sandbox) {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const el = section("Egress log", body);
  const path = sandbox ? `${groupPath(group)}/sandboxes/${encodeURIComponent(sandbox)}/egress` : `${groupPath(group)}/egress`;
  const refresh = async () => {
    try {
      const { items } = await call("GET", path, { query: { limit: 50 } });
      fill(
        body,
        table(
          "Egress events",
          ["Time", ...(sandbox ? [] : ["Sandbox"]), "Kind", "Name", "Address", "Verdict", "Reason", "Bytes out / in"],
          items.reverse().map((e) => [
            e.time.replace("T", " ").replace(/\.\d+Z$/, "Z"),
            ...(sandbox ? [] : [e.sandbox]),
            e.kind,
            e.name ?? "",
            e.port ? `${e.address}:${e.port}` : e.address ?? "",
            badge(e.verdict),
            e.reason ?? "",
            e.kind === "dns" ? "" : `${e.bytes_sent ?? 0} / ${e.bytes_received ?? 0}`,
          ]),
          "No connections or DNS queries yet (newest 50 shown here).",
        ),
      );
    } catch (e) {
      fill(body, h("p", { class: "status status-error" }, e.message));
    }
  };
  return { el, refresh };
}

function policySection(group) {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const decisions = h("div", {});
  const el = section("Policy", body, h("h3", {}, "Decisions"), decisions);
  const refresh = async () => {
    try {
      const p = await call("GET", `${groupPath(group)}/policy`);
      fill(
        body,
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Version"),
          h("dd", {}, p.version === 0 ? "0 (no policy)" : String(p.version)),
          h("dt", {}, "Mode"),
          h("dd", {}, badge(p.policy.mode ?? "off")),
          p.author ? [h("dt", {}, "Author"), h("dd", {}, p.author)] : null,
        ),
        h("details", {}, h("summary", {}, "Policy document"), h("pre", {}, JSON.stringify(p.policy, null, 2))),
      );
    } catch (e) {
      fill(body, h("p", { class: "status status-error" }, e.message));
    }
    try {
      const { items } = await call("GET", `${groupPath(group)}/policy/decisions`, { query: { limit: 20 } });
      fill(
        decisions,
        table(
          "Policy decisions",
          ["#", "Time", "Route", "Sandbox", "Request", "Verdict", "Findings"],
          items.reverse().map((d) => [
            String(d.n),
            d.at.replace("T", " ").replace(/\.\d+Z$/, "Z"),
            d.route,
            d.sandbox ?? "",
            h("code", {}, requestText(d.request)),
            badge(d.verdict),
            (d.decision.findings ?? []).map((f) => f.rule).join(", "),
          ]),
          "No decisions recorded (the newest 20 are shown here).",
        ),
      );
    } catch (e) {
      // Readers and users may not read the decisions log: say so instead of an empty table.
      fill(decisions, h("p", { class: "empty" }, e.status === 403 ? "Only owner and admin keys can read the decisions log." : e.message));
    }
  };
  return { el, refresh };
}

function requestText(r) {
  const s = r.command ?? r.shell ?? r.python ?? (r.argv ? r.argv.join(" ") : JSON.stringify(r));
  return s.length > 80 ? `${s.slice(0, 79)}…` : s;
}

export function groupView(main, group) {
  const spec = h("div", {}, h("p", {}, "Loading…"));
  const list = h("div", {}, h("p", {}, "Loading…"));
  const snaps = h("div", {});
  const msg = h("p", { role: "status", class: "status" });
  const labels = h("input", { id: "new-labels", placeholder: "app=agent, team=ml" });
  const create = h(
    "button",
    {
      type: "button",
      class: "primary",
      onclick: async () => {
        create.disabled = true;
        status(msg, "Creating a sandbox…");
        try {
          const sb = await call("POST", `${groupPath(group)}/sandboxes`, { json: { labels: parseLabels(labels.value) } });
          status(msg, `Created ${sb.id}.`, "ok");
          await refresh();
        } catch (e) {
          status(msg, `Create failed: ${e.message}`, "error");
        } finally {
          create.disabled = false;
        }
      },
    },
    "Create sandbox",
  );
  const egress = egressSection(group);
  const policy = policySection(group);
  fill(
    main,
    h("p", { class: "crumbs" }, h("a", { href: "#/groups" }, "Groups"), " / ", group),
    h("h1", {}, `Group ${group}`),
    section("Spec and pool", spec),
    section(
      "Sandboxes",
      h("div", { class: "toolbar" }, h("label", { for: "new-labels" }, "Labels"), labels, create),
      msg,
      list,
    ),
    section("Snapshots", snaps),
    policy.el,
    egress.el,
  );
  const refresh = async () => {
    try {
      const g = await call("GET", groupPath(group));
      const s = g.spec;
      fill(
        spec,
        h(
          "dl",
          { class: "facts" },
          h("dt", {}, "Image"),
          h("dd", {}, s.image),
          h("dt", {}, "Tier"),
          h("dd", {}, s.tier),
          h("dt", {}, "Warm pool"),
          h("dd", {}, `${g.status.pool_ready} ready of ${s.pool.size}`),
          h("dt", {}, "Lifecycle"),
          h("dd", {}, lifecycleText(s.lifecycle)),
          h("dt", {}, "Egress"),
          h("dd", {}, `default ${s.egress.default}, ${s.egress.rules?.length ?? 0} rule(s)`),
          h("dt", {}, "Labels"),
          h("dd", {}, labelsText(s.labels) || "none"),
        ),
        h("details", {}, h("summary", {}, "Full spec (JSON)"), h("pre", {}, JSON.stringify(s, null, 2))),
      );
      const { sandboxes } = await call("GET", `${groupPath(group)}/sandboxes`);
      fill(
        list,
        table(
          "Sandboxes",
          ["Sandbox", "State", "Tier", "Node", "Age", "Labels"],
          sandboxes.map((sb) => [sandboxLink(group, sb.id), badge(sb.state), sb.tier, sb.node ?? "", age(sb.created_at), labelsText(sb.labels)]),
          "No sandboxes in this group.",
        ),
      );
      const { snapshots } = await call("GET", `${groupPath(group)}/snapshots`);
      fill(
        snaps,
        table(
          "Snapshots",
          ["Name", "From sandbox", "Tier", "Size", "Age"],
          snapshots.map((s) => [s.name, s.sandbox, s.tier, `${Math.round(s.size_bytes / 1048576)} MiB`, age(s.created_at)]),
          "No snapshots.",
        ),
      );
    } catch (e) {
      fill(list, h("p", { role: "alert", class: "status status-error" }, e.message));
    }
  };
  const stops = [poll(refresh, 2000), poll(egress.refresh, 3000), poll(policy.refresh, 5000)];
  return () => stops.forEach((s) => s());
}

function lifecycleText(l) {
  const parts = [];
  if (l.idle_timeout_s) parts.push(`idle ${l.idle_timeout_s} s → ${l.on_idle}`);
  if (l.suspended_ttl_s) parts.push(`suspended TTL ${l.suspended_ttl_s} s`);
  if (l.max_lifetime_s) parts.push(`max lifetime ${l.max_lifetime_s} s`);
  return parts.join("; ") || "no timers";
}

/** "a=b, c=d" → {a: "b", c: "d"}; the API says what is wrong with a bad label. */
export function parseLabels(text) {
  const out = {};
  for (const pair of text.split(",").map((s) => s.trim()).filter(Boolean)) {
    const i = pair.indexOf("=");
    if (i < 0) out[pair] = "";
    else out[pair.slice(0, i).trim()] = pair.slice(i + 1).trim();
  }
  return out;
}
