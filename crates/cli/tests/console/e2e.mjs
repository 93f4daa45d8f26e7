// The web console end to end in headless Chromium against a real daemon (run by
// crates/cli/tests/console.rs): sign in (a wrong key first), create a sandbox, type `echo hi`
// in the terminal and see `hi`, upload and download a file, suspend and resume, the metrics
// charts, the nodes page (drain and undrain the daemon's node); a shell WebSocket with a
// wrong key is refused; no page error and no Content-Security-Policy violation on the way.
// Screenshots go to MOAT_SHOTS.
//
// Environment: MOAT_URL, MOAT_API_KEY (an admin key), MOAT_TEST_GROUP, CHROMIUM (the
// browser's path), MOAT_SHOTS (a directory).

import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { chromium } from "playwright-core";

const { MOAT_URL: url, MOAT_API_KEY: key, MOAT_TEST_GROUP: group, CHROMIUM, MOAT_SHOTS: shots } = process.env;
const api = (method, path, body) =>
  fetch(url + path, {
    method,
    headers: { Authorization: `Bearer ${key}`, "Content-Type": "application/json" },
    body: body && JSON.stringify(body),
  });
const step = (what) => console.log(`step: ${what}`);

const r = await api("PUT", `/v1/sandbox-groups/${group}`, { tier: "s", labels: { team: "console" } });
assert.ok(r.status === 200 || r.status === 201, `PUT group: ${r.status} ${await r.text()}`);

// Root has no user namespace sandbox for Chromium: its own sandbox needs --no-sandbox here.
const browser = await chromium.launch({ executablePath: CHROMIUM, args: ["--no-sandbox"] });
const problems = [];
let sandbox;
let page;
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 800 }, acceptDownloads: true });
  page = await context.newPage();
  page.on("pageerror", (e) => problems.push(`page error: ${e.message}`));
  page.on("console", (m) => {
    // The only errors allowed are the API's answers to what this test does wrong on purpose.
    if (m.type() === "error" && !/status of 401|failed: Error during WebSocket handshake|\/shell\?/.test(m.text())) {
      problems.push(`console error: ${m.text()} (${m.location().url})`);
    }
  });

  step("the page is served with its policy");
  const first = await page.goto(`${url}/ui/`);
  const csp = first.headers()["content-security-policy"];
  assert.match(csp, /script-src 'self'(;|$)/);

  step("a wrong key is refused");
  await page.getByLabel("API key").fill("moat_wrongwrongwrongwrongwrongwrongwrongwrong0");
  await page.getByRole("button", { name: "Sign in" }).click();
  await page.getByRole("alert").filter({ hasText: "Sign-in failed" }).waitFor();

  step("sign in with the keyboard only");
  await page.getByLabel("API key").focus();
  await page.keyboard.press("Control+A");
  await page.keyboard.type(key);
  await page.keyboard.press("Enter");
  await page.getByRole("heading", { name: "Sandbox groups" }).waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("moat.apiKey")), key);

  step("the group and its spec");
  await page.getByRole("link", { name: group, exact: true }).click();
  await page.getByRole("heading", { name: `Group ${group}` }).waitFor();
  await page.getByText("team=console").first().waitFor();

  step("create a sandbox");
  await page.getByLabel("Labels").fill("app=console-test");
  await page.getByRole("button", { name: "Create sandbox" }).click();
  const created = page.locator(".status-ok").filter({ hasText: /^Created sb-/ });
  await created.waitFor({ timeout: 120_000 });
  sandbox = (await created.textContent()).match(/sb-[0-9a-f]{12}/)[0];
  await page.getByRole("link", { name: sandbox }).click();
  await page.getByRole("heading", { name: `Sandbox ${sandbox}` }).waitFor();
  await page.locator("#sandbox-state").filter({ hasText: "running" }).waitFor();
  const node = (await (await api("GET", `/v1/sandbox-groups/${group}/sandboxes/${sandbox}`)).json()).node;
  assert.ok(node, "the sandbox shows its node");
  await page.locator("#sandbox-node").filter({ hasText: node }).waitFor();

  step("a shell WebSocket with a wrong key is refused");
  const refused = await page.evaluate(
    ([g, id]) =>
      new Promise((done) => {
        const ws = new WebSocket(`ws://${location.host}/v1/sandbox-groups/${g}/sandboxes/${id}/shell?cols=80&rows=24`, [
          "moat.shell.v1",
          "moat.key.moat_wrongwrongwrongwrongwrongwrongwrongwrong0",
        ]);
        ws.onopen = () => done("opened");
        ws.onclose = () => done("refused");
      }),
    [group, sandbox],
  );
  assert.equal(refused, "refused");
  // With the right key it opens, and the server selects the shell's subprotocol (never the
  // one that carries the key).
  const chosen = await page.evaluate(
    ([g, id, k]) =>
      new Promise((done) => {
        const ws = new WebSocket(`ws://${location.host}/v1/sandbox-groups/${g}/sandboxes/${id}/shell?cols=80&rows=24`, [
          "moat.shell.v1",
          `moat.key.${k}`,
        ]);
        ws.onopen = () => {
          done(ws.protocol);
          ws.close();
        };
        ws.onclose = () => done("refused");
      }),
    [group, sandbox, key],
  );
  assert.equal(chosen, "moat.shell.v1");

  step("type `echo hi` in the terminal and see hi");
  await page.getByRole("button", { name: "Open terminal" }).click();
  await page.locator("#terminal-status").filter({ hasText: "Connected" }).waitFor({ timeout: 60_000 });
  // The prompt first: typing before the shell reads its terminal would still work, but the
  // screenshot should show a real session.
  // (xterm's rows hold no-break spaces.)
  await page.waitForFunction(
    () => [...document.querySelectorAll(".xterm-rows > div")].some((row) => /[#$]$/.test(row.textContent.replace(/\u00a0/g, " ").trim())),
    null,
    { timeout: 60_000 },
  );
  await page.keyboard.type("echo hi");
  await page.keyboard.press("Enter");
  await page.waitForFunction(
    () => [...document.querySelectorAll(".xterm-rows > div")].some((row) => row.textContent.replace(/\u00a0/g, " ").trim() === "hi"),
    null,
    { timeout: 60_000 },
  );
  await page.screenshot({ path: join(shots, "sandbox-terminal.png") });

  step("Ctrl+] leaves the terminal for the page");
  await page.keyboard.press("Control+]");
  assert.equal(await page.evaluate(() => document.activeElement.id), "terminal-close");

  step("upload a file");
  const content = `uploaded from the console ${Date.now()}\n`;
  await page.getByLabel("Upload into this directory").setInputFiles({ name: "note.txt", mimeType: "text/plain", buffer: Buffer.from(content) });
  await page.getByRole("button", { name: "Upload", exact: true }).click();
  await page.locator("#files-status").filter({ hasText: "Uploaded /root/note.txt" }).waitFor();
  const inGuest = await api("GET", `/v1/sandbox-groups/${group}/sandboxes/${sandbox}/files?path=/root/note.txt`);
  assert.equal(await inGuest.text(), content);

  step("download it");
  const [download] = await Promise.all([
    page.waitForEvent("download"),
    page.getByRole("button", { name: "Download note.txt" }).click(),
  ]);
  assert.equal(download.suggestedFilename(), "note.txt");
  assert.equal(await readFile(await download.path(), "utf8"), content);

  step("suspend and resume");
  await page.getByRole("button", { name: "Suspend" }).click();
  await page.locator("#sandbox-state").filter({ hasText: "suspended" }).waitFor({ timeout: 60_000 });
  await page.locator("#terminal-status").filter({ hasText: "Closed: the sandbox was suspended." }).waitFor();
  assert.equal((await (await api("GET", `/v1/sandbox-groups/${group}/sandboxes/${sandbox}`)).json()).state, "suspended");
  await page.getByRole("button", { name: "Resume" }).click();
  await page.locator("#sandbox-state").filter({ hasText: "running" }).waitFor({ timeout: 60_000 });
  assert.equal((await (await api("GET", `/v1/sandbox-groups/${group}/sandboxes/${sandbox}`)).json()).state, "running");
  await page.screenshot({ path: join(shots, "sandbox-resumed.png"), fullPage: true });

  step("the group lists the sandbox with its labels");
  await page.getByRole("link", { name: group }).click();
  await page.getByRole("row").filter({ hasText: sandbox }).filter({ hasText: "app=console-test" }).waitFor();
  await page.screenshot({ path: join(shots, "group.png"), fullPage: true });

  step("metrics charts");
  await page.getByRole("link", { name: "Metrics" }).click();
  // A line of two points or more in each chart that has data (a flat line has no height, so
  // Playwright calls it hidden: count points instead).
  for (const chart of ["sandboxes", "requests", "memory"]) {
    await page.waitForFunction(
      (id) => (document.querySelector(`#chart-${id} polyline`)?.getAttribute("points") ?? "").split(" ").length >= 2,
      chart,
      { timeout: 20_000 },
    );
  }
  await page.screenshot({ path: join(shots, "metrics.png") });

  step("nodes: the daemon's node, drained and undrained from the page");
  await page.getByRole("link", { name: "Nodes" }).click();
  await page.getByRole("heading", { name: "Nodes" }).waitFor();
  const row = page.getByRole("row").filter({ hasText: node });
  await row.filter({ hasText: "ready" }).waitFor();
  await page.getByRole("button", { name: `Drain ${node}` }).click();
  await row.filter({ hasText: "draining" }).waitFor();
  assert.equal((await (await api("GET", `/v1/nodes/${node}`)).json()).state, "draining");
  await page.screenshot({ path: join(shots, "nodes.png") });
  await page.getByRole("button", { name: `Undrain ${node}` }).click();
  await row.filter({ hasText: "ready" }).waitFor();
  assert.equal((await (await api("GET", `/v1/nodes/${node}`)).json()).state, "ready");

  step("sign out forgets the key");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.getByLabel("API key").waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.getItem("moat.apiKey")), null);
} catch (e) {
  await page?.screenshot({ path: join(shots, "failure.png"), fullPage: true });
  console.log(`failure screenshot: ${join(shots, "failure.png")}`);
  throw e;
} finally {
  await browser.close();
  if (sandbox) await api("DELETE", `/v1/sandbox-groups/${group}/sandboxes/${sandbox}`);
}
assert.deepEqual(problems, []);
console.log(`console e2e: ok (screenshots in ${shots})`);
