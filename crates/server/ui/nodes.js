// The nodes of the fleet (docs/FLEET.md): every daemon sharing the store, its state, lease,
// capacity and use, refreshed by polling; an admin key may drain and undrain one here.

import { call } from "./api.js";
import { badge, fill, h, labelsText, poll, status } from "./dom.js";
import { table } from "./views.js";

const until = (iso) => {
  const s = Math.round((Date.parse(iso) - Date.now()) / 1000);
  return s >= 0 ? `in ${s} s` : `${-s} s ago`;
};

/** `used / capacity` with the share, e.g. "1536 / 4096 MiB (38 %)". */
const share = (used, cap, unit) =>
  `${+used.toFixed(2)} / ${+cap.toFixed(2)}${unit} (${cap ? Math.round((100 * used) / cap) : 0}\u00a0%)`;

export function nodesView(main) {
  const body = h("div", {}, h("p", {}, "Loading…"));
  const msg = h("p", { role: "status", class: "status" });
  fill(main, h("h1", {}, "Nodes"), msg, body);
  const act = async (node, verb) => {
    try {
      await call("POST", `/v1/nodes/${encodeURIComponent(node)}/${verb}`);
      status(msg, `Node ${node}: ${verb === "drain" ? "draining, it takes no new sandboxes" : "ready again"}.`, "info");
      await refresh();
    } catch (e) {
      status(msg, `${verb} ${node}: ${e.message}`, "error");
    }
  };
  const refresh = async () => {
    try {
      const { nodes } = await call("GET", "/v1/nodes");
      fill(
        body,
        table(
          "Nodes",
          ["Node", "State", "Epoch", "Lease ends", "Accelerator", "Memory", "vCPUs", "Sandboxes", "Labels", "URL", "Action"],
          nodes.map((n) => [
            n.name,
            [badge(n.state), n.lost_reason ? ` ${n.lost_reason}` : ""],
            String(n.epoch),
            h("span", { title: n.lease_expires_at }, until(n.lease_expires_at)),
            n.accelerator,
            share(n.used.memory_mib, n.capacity.memory_mib, " MiB"),
            share(n.used.vcpus, n.capacity.vcpus, ""),
            String(n.used.sandboxes),
            labelsText(n.labels),
            h("span", { class: "mono" }, n.advertise_url),
            n.state === "lost"
              ? ""
              : h(
                  "button",
                  { type: "button", onclick: () => act(n.name, n.state === "draining" ? "undrain" : "drain") },
                  n.state === "draining" ? `Undrain ${n.name}` : `Drain ${n.name}`,
                ),
          ]),
          "No nodes: the daemon has not taken its lease yet.",
        ),
      );
    } catch (e) {
      fill(body, h("p", { role: "alert", class: "status status-error" }, e.message));
    }
  };
  return poll(refresh, 3000);
}
