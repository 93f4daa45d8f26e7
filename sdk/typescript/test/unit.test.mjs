// The client without a daemon: errors by status, a daemon that cannot be reached, bad URLs,
// and what goes on the wire (a fetch that records requests).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  BadGateway,
  BadRequest,
  CapacityError,
  Client,
  ConnectionFailed,
  InternalError,
  MoatError,
  NotFound,
  PolicyDenied,
  TooManyRequests,
  Unprocessable,
} from "../dist/index.js";

/** A fetch that answers `status` with `body` and records what it was asked. */
function fake(status, body, seen = []) {
  return async (url, init) => {
    seen.push({ url, init });
    return new Response(body, { status, headers: { "content-type": "application/json" } });
  };
}

test("an error answer becomes the class of its status, with code and message", async () => {
  const body = JSON.stringify({ error: { code: "not_found", message: 'no sandbox "sb-1"' } });
  const c = new Client("http://127.0.0.1:1", "moat_x", { fetch: fake(404, body) });
  const e = await c.sandboxes.get("g", "sb-1").catch((e) => e);
  assert.ok(e instanceof NotFound && e instanceof MoatError);
  assert.deepEqual([e.status, e.code, e.message], [404, "not_found", 'no sandbox "sb-1"']);
  assert.equal(e.name, "NotFound");
});

test("a body that is not the error shape still gives the status's class", async () => {
  const c = new Client("http://127.0.0.1:1", "k", { fetch: fake(502, "<html>bad gateway</html>") });
  const e = await c.health().catch((e) => e);
  assert.ok(e instanceof InternalError);
  assert.deepEqual([e.status, e.code, e.message], [502, "http_502", "<html>bad gateway</html>"]);
  const c2 = new Client("http://127.0.0.1:1", "k", {
    fetch: fake(429, JSON.stringify({ error: { code: "too_many_requests", message: "full" } })),
  });
  const e2 = await c2.health().catch((e) => e);
  assert.ok(e2 instanceof TooManyRequests && e2 instanceof CapacityError);
});

test("a policy refusal is PolicyDenied with its findings and version", async () => {
  const finding = { rule: "python.process", message: "os.system", line: 2, column: 1, snippet: "os.system('id')" };
  const body = JSON.stringify({
    error: { code: "policy_denied", message: "refused", findings: [finding], policy_version: 4 },
  });
  const c = new Client("http://127.0.0.1:1", "k", { fetch: fake(403, body) });
  const e = await c.groups.policy.check("g", { python: "x" }).catch((e) => e);
  assert.ok(e instanceof PolicyDenied && e instanceof MoatError, String(e));
  assert.deepEqual([e.status, e.code, e.message, e.policyVersion], [403, "policy_denied", "refused", 4]);
  assert.deepEqual(e.findings, [finding]);
  assert.equal(e.name, "PolicyDenied");
});

test("an unreachable daemon is ConnectionFailed with no status", async () => {
  const c = new Client("http://127.0.0.1:9", "k");
  const e = await c.health().catch((e) => e);
  assert.ok(e instanceof ConnectionFailed, String(e));
  assert.equal(e.status, null);
  assert.match(e.message, /cannot reach the moat daemon at http:\/\/127\.0\.0\.1:9/);
});

test("bad URLs are refused at construction", () => {
  assert.throws(() => new Client("ftp://x"), /http:\/\/ or https:\/\//);
});

test("requests carry the key, JSON bodies and encoded queries", async () => {
  const seen = [];
  const info = { id: "sb-1", group: "g", state: "running" };
  const c = new Client("http://h:1/", "moat_key", { fetch: fake(200, JSON.stringify(info), seen) });
  const sb = await c.sandboxes.get("g", "sb-1");
  await sb.exec(["echo", "a b"], { env: { A: "1" }, timeout: 5, user: 0 });
  await sb.files.list("/root/a b&c");
  const [get, exec, list] = seen;
  assert.equal(get.url, "http://h:1/v1/sandbox-groups/g/sandboxes/sb-1");
  assert.equal(get.init.headers.authorization, "Bearer moat_key");
  assert.deepEqual(JSON.parse(exec.init.body), { argv: ["echo", "a b"], env: { A: "1" }, user: "0", timeout_s: 5 });
  assert.equal(list.url, "http://h:1/v1/sandbox-groups/g/sandboxes/sb-1/files/list?path=%2Froot%2Fa%20b%26c");
  const e = await new Client("http://h:1", "k", {
    fetch: fake(400, JSON.stringify({ error: { code: "bad_request", message: "no" } })),
  })
    .groups.apply("x", {})
    .catch((e) => e);
  assert.ok(e instanceof BadRequest);
  // A rule the document cannot state (422) is still a BadRequest, of its own class.
  const u = await new Client("http://h:1", "k", {
    fetch: fake(422, JSON.stringify({ error: { code: "unprocessable", message: "exactly one" } })),
  })
    .groups.apply("x", {})
    .catch((e) => e);
  assert.ok(u instanceof Unprocessable && u instanceof BadRequest && u.status === 422);
  // The daemon's 502 (an agent failure) by its code; a proxy's 502 page stays an InternalError.
  const g = await new Client("http://h:1", "k", {
    fetch: fake(502, JSON.stringify({ error: { code: "bad_gateway", message: "agent" } })),
  })
    .groups.apply("x", {})
    .catch((e) => e);
  assert.ok(g instanceof BadGateway);
  const p = await new Client("http://h:1", "k", { fetch: fake(502, "<html>Bad Gateway</html>") })
    .groups.apply("x", {})
    .catch((e) => e);
  assert.ok(p instanceof InternalError && !(p instanceof BadGateway));
});
