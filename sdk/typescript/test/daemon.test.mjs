// The SDK against a real daemon (MOAT_URL, MOAT_API_KEY: an admin key; the group
// MOAT_TEST_GROUP is made and deleted here). Skipped without MOAT_URL unless
// MOAT_TEST_REQUIRE_DAEMON is set, which crates/cli/tests/sdk_typescript.rs does.
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { Client, Conflict, Forbidden, NotFound, PolicyDenied, Sandbox, BadRequest } from "../dist/index.js";

const URL = process.env.MOAT_URL;
if (!URL && process.env.MOAT_TEST_REQUIRE_DAEMON) throw new Error("MOAT_URL is not set");
const GROUP = process.env.MOAT_TEST_GROUP ?? "sdk-ts-test";
const text = (b) => new TextDecoder().decode(b);

describe("against a daemon", { skip: !URL && "no MOAT_URL" }, () => {
  const client = new Client();
  /** @type {Sandbox} */
  let sb;

  before(async () => {
    const g = await client.groups.apply(GROUP, { tier: "s", labels: { sdk: "ts" } });
    assert.equal(g.spec.tier, "s");
    sb = await client.sandboxes.create(GROUP, { env: { MODE: "test" }, labels: { app: "ts" } });
  });

  after(async () => {
    await sb?.dispose();
    await client.groups.delete(GROUP, { force: true });
  });

  test("health, groups and the sandbox's info", async () => {
    assert.equal((await client.health()).sandboxes.state, "ready");
    assert.ok((await client.groups.list()).some((g) => g.name === GROUP));
    assert.equal((await client.groups.get(GROUP)).spec.labels.sdk, "ts");
    assert.equal(sb.state, "running");
    assert.match(sb.id, /^sb-[0-9a-f]{12}$/);
    const listed = await client.sandboxes.list(GROUP, { labels: { app: "ts" } });
    assert.deepEqual(listed.map((s) => s.id), [sb.id]);
    assert.deepEqual(await client.sandboxes.list(GROUP, { labels: { app: "other" } }), []);
    assert.equal((await sb.refresh()).env.MODE, "test");
  });

  test("nodes: the daemon is one ready node with its sealing key; a rotation needs a next key", async () => {
    const [n] = await client.nodes.list();
    assert.equal(n.state, "ready");
    assert.equal((await client.nodes.get(n.name)).advertise_url, n.advertise_url);
    assert.match(n.sealing_key_id, /^[0-9a-f]{16}$/);
    await assert.rejects(client.nodes.rotateSealingKey(), (e) => e instanceof Conflict && /moat sealing-key new/.test(e.message));
  });

  test("exec collects output, exit codes, stdin, env, cwd and timeouts", async () => {
    let r = await sb.exec("echo $MODE; echo err >&2; exit 3");
    assert.deepEqual([r.exit_code, r.stdout, r.stderr, r.timed_out], [3, "test\n", "err\n", false]);
    r = await sb.exec(["sh", "-c", 'cat; echo " $X $(pwd)"'], { stdin: "in", env: { X: "x" }, cwd: "/tmp" });
    assert.equal(r.stdout, "in x /tmp\n");
    r = await sb.exec("sleep 10", { timeout: 0.5 });
    assert.deepEqual([r.exit_code, r.timed_out], [124, true]);
    r = await sb.exec(["no-such-command"]);
    assert.equal(r.exit_code, 127);
    await assert.rejects(sb.exec("true", { cwd: "relative" }), BadRequest);
  });

  test("execStream yields output as it comes, then the exit; breaking off kills the command", async () => {
    const events = [];
    const stream = sb.execStream("echo a; sleep 0.2; echo b >&2; exit 4");
    for await (const ev of stream) events.push(ev);
    assert.deepEqual(events, [
      { type: "output", stream: "stdout", data: "a\n" },
      { type: "output", stream: "stderr", data: "b\n" },
      { type: "exit", exit_code: 4, signal: null, timed_out: false },
    ]);
    assert.equal(stream.exit.exit_code, 4);

    const started = Date.now();
    for await (const ev of sb.execStream("echo go; sleep 600")) {
      assert.equal(ev.data, "go\n");
      break;
    }
    assert.ok(Date.now() - started < 30_000);
    // The sleep was killed with the connection: nothing of it is left.
    const deadline = Date.now() + 10_000;
    for (;;) {
      const ps = await sb.exec("ps -eo args | grep -c '^sleep 600' || true");
      if (ps.stdout.trim() === "0") break;
      assert.ok(Date.now() < deadline, "the streamed command outlived its connection");
      await new Promise((r) => setTimeout(r, 200));
    }
  });

  test("files: strings, bytes and streams up; bytes and streams down; list, mode, remove", async () => {
    let w = await sb.files.write("/root/t/a.txt", "héllo", { parents: true });
    assert.deepEqual(w, { path: "/root/t/a.txt", size: 6, created: true });
    w = await sb.files.write("/root/t/a.txt", new Uint8Array([104, 105]));
    assert.equal(w.created, false);
    assert.equal(text(await sb.files.read("/root/t/a.txt")), "hi");

    async function* chunks() {
      for (let i = 0; i < 64; i++) yield new Uint8Array(16 * 1024).fill(i);
    }
    w = await sb.files.write("/root/t/big.bin", chunks(), { mode: 0o600 });
    assert.equal(w.size, 64 * 16 * 1024);
    let total = 0;
    let last = -1;
    for await (const c of await sb.files.readStream("/root/t/big.bin")) {
      total += c.length;
      last = c[c.length - 1];
    }
    assert.deepEqual([total, last], [64 * 16 * 1024, 63]);

    const entries = await sb.files.list("/root/t");
    assert.deepEqual(entries.map((e) => [e.name, e.kind]), [["a.txt", "file"], ["big.bin", "file"]]);
    assert.equal(entries[1].mode, "0600");
    await sb.files.remove("/root/t", { recursive: true });
    const e = await sb.files.read("/root/t/a.txt").catch((e) => e);
    assert.ok(e instanceof NotFound, String(e));
    assert.equal(e.status, 404);
  });

  test("background processes: start, list, logs, wait, kill", async () => {
    const p = await sb.processes.start("echo out; echo err >&2; exit 2");
    assert.match(p.id, /^p\d+$/);
    const done = await p.wait(30);
    assert.equal(done.exit_code, 2);
    assert.deepEqual(await p.logs(), { stdout: "out\n", stderr: "err\n" });
    const long = await sb.processes.start(["sleep", "600"]);
    await assert.rejects(long.wait(0), Conflict);
    assert.ok((await sb.processes.list()).some((x) => x.id === long.id && x.running));
    await long.kill(9);
    assert.equal((await long.wait(30)).signal, 9);
  });

  test("shell: a terminal over the WebSocket, its output and exit code", async () => {
    const sh = await sb.shell({ command: "sh", cols: 100, rows: 30 });
    sh.resize(120, 40);
    sh.write("stty size; echo hi-$((6*7)); exit 3\n");
    const { output, exit } = await sh.collect();
    assert.match(output, /40 120/);
    assert.match(output, /hi-42/);
    assert.equal(exit.exit_code, 3);
    const e = await sb.shell({ cols: 0 }).catch((e) => e);
    assert.ok(e instanceof BadRequest, String(e));
  });

  test("suspend, resume, snapshot and fork", async () => {
    await sb.exec("echo state > /root/s");
    assert.equal((await sb.suspend()).state, "suspended");
    assert.equal((await sb.exec("cat /root/s")).stdout, "state\n"); // resumed by the exec
    assert.equal((await sb.refresh()).state, "running");
    await sb.suspend();
    assert.equal((await sb.resume()).state, "running");

    const snap = await sb.snapshot("ts-snap");
    assert.deepEqual([snap.name, snap.group, snap.sandbox], ["ts-snap", GROUP, sb.id]);
    assert.ok((await client.snapshots.list(GROUP)).some((s) => s.name === "ts-snap"));
    assert.equal((await client.snapshots.get(GROUP, "ts-snap")).tier, "s");
    const forks = await client.sandboxes.fork(GROUP, "ts-snap", 2, { labels: { fork: "yes" } });
    try {
      assert.equal(forks.length, 2);
      const seeds = new Set();
      for (const f of forks) {
        assert.equal((await f.exec("cat /root/s")).stdout, "state\n");
        assert.equal(f.info.labels.fork, "yes");
        seeds.add((await f.exec("head -c 16 /dev/urandom | od -An -tx1")).stdout);
      }
      assert.equal(seeds.size, 2, "two forks read the same random bytes");
    } finally {
      for (const f of forks) await f.delete();
    }
    await client.snapshots.delete(GROUP, "ts-snap");
    await assert.rejects(client.snapshots.get(GROUP, "ts-snap"), NotFound);
  });

  test("API keys and roles: a reader may look but not create", async () => {
    const k = await client.apiKeys.create("ts-reader", "reader", [GROUP]);
    try {
      assert.match(k.key, /^moat_/);
      assert.ok((await client.apiKeys.list()).some((x) => x.id === k.id));
      const reader = new Client(undefined, k.key);
      assert.equal((await reader.sandboxes.get(GROUP, sb.id)).info.env.MODE, "<redacted>");
      const e = await reader.sandboxes.create(GROUP).catch((e) => e);
      assert.ok(e instanceof Forbidden, String(e));
      assert.equal(e.code, "forbidden");
    } finally {
      await client.apiKeys.delete(k.id);
    }
  });

  test("policy: apply, dry run, PolicyDenied before the VM, decisions, rollback", async () => {
    const v1 = await client.groups.policy.apply(GROUP, { mode: "enforce", commands: { deny: ["touch"] } });
    try {
      const check = await client.groups.policy.check(GROUP, { command: "touch /tmp/x" });
      assert.equal(check.allowed, false);
      assert.equal(check.findings[0].rule, "command.denied");
      const e = await sb.exec("touch /tmp/ts-refused").catch((e) => e);
      assert.ok(e instanceof PolicyDenied && e instanceof Forbidden, String(e));
      assert.deepEqual([e.status, e.code, e.policyVersion], [403, "policy_denied", v1.version]);
      assert.equal(e.findings[0].rule, "command.denied");
      assert.match(e.findings[0].snippet, /touch/);
      assert.deepEqual((await client.groups.policy.check(GROUP, { argv: ["ls", "/tmp"] })).findings, []);
      const log = await client.groups.policy.decisions(GROUP, { verdict: "deny" });
      assert.equal(log.items.at(-1).route, "exec");
      const v2 = await client.groups.policy.apply(GROUP, { mode: "audit" });
      const back = await client.groups.policy.rollback(GROUP, v1.version);
      assert.deepEqual([back.version, back.policy.mode], [v2.version + 1, "enforce"]);
      assert.equal((await client.groups.policy.versions(GROUP)).length, back.version);
      await assert.rejects(client.groups.policy.rollback(GROUP, back.version + 100), NotFound);
    } finally {
      await client.groups.policy.apply(GROUP, { mode: "off" });
    }
    assert.doesNotMatch((await sb.exec(["ls", "/tmp"])).stdout, /ts-refused/);
  });
});
