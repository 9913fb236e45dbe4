// Browser test of the web console: Playwright (playwright-core) driving
// Debian's chromium, headless, against a real `gpupool-scheduler dev`
// that tests/console.rs starts (with fake GPUs) and describes in the
// environment:
//   CONSOLE_URL     the console, e.g. http://127.0.0.1:17080
//   TOKEN_A         tenant A's API token (quota for 3 dedicated nodes)
//   TOKEN_B         tenant B's
//   ADMIN_TOKEN     the admin token
//   SOLD_OUT_SPEC   a spec whose every node is taken
//   SHOTS_DIR       where the screenshots go
// Every step prints a line; the first failed check throws (exit 1).
import { chromium } from "playwright-core";
import http from "node:http";
import net from "node:net";
import fs from "node:fs";
import path from "node:path";

const URL_ = process.env.CONSOLE_URL;
const { TOKEN_A, TOKEN_B, ADMIN_TOKEN, SOLD_OUT_SPEC, SHOTS_DIR } = process.env;
for (const [k, v] of Object.entries({ CONSOLE_URL: URL_, TOKEN_A, TOKEN_B, ADMIN_TOKEN, SOLD_OUT_SPEC, SHOTS_DIR })) {
  if (!v) throw new Error(`${k} is not set`);
}
fs.mkdirSync(SHOTS_DIR, { recursive: true });

function check(ok, what) {
  if (!ok) throw new Error(`FAILED: ${what}`);
  console.log(`ok - ${what}`);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  headless: true,
  args: ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const viewport = { width: 1280, height: 900 };

async function noHorizontalScroll(page, what) {
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 1280, `${what}: no horizontal scrolling at 1280 px (scrollWidth ${width})`);
}

async function shot(page, name) {
  await page.screenshot({ path: path.join(SHOTS_DIR, `${name}.png`), fullPage: true });
}

// Keyboard only: Tab until the focused element matches `selector`.
async function tabTo(page, selector, max = 80) {
  for (let i = 0; i < max; i++) {
    await page.keyboard.press("Tab");
    if (await page.evaluate((s) => document.activeElement?.matches(s) ?? false, selector)) return;
  }
  throw new Error(`FAILED: Tab never reached ${selector}`);
}

async function signIn(page, token) {
  await page.goto(`${URL_}/login`);
  await page.fill("#token", token);
  await page.press("#token", "Enter");
  await page.waitForURL(`${URL_}/pools`);
}

// Reloads `url` until `test(page)` holds, for up to `ms`.
async function until(page, url, test, what, ms = 60000) {
  const end = Date.now() + ms;
  for (;;) {
    await page.goto(url);
    if (await test(page)) return check(true, what);
    if (Date.now() > end) return check(false, what);
    await page.waitForTimeout(500);
  }
}

// 1. A signed-out browser gets the sign-in page for every URL.
{
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  for (const p of ["/", "/pools", "/pools/new", "/pools/new/train", "/pools/p-x", "/pools/p-x/delete",
    "/jobs", "/jobs/new", "/jobs/j-x", "/jobs/j-x/log", "/usage", "/usage.csv", "/admin/nodes",
    "/admin/tenants", "/no/such/page"]) {
    await page.goto(`${URL_}${p}`);
    check(page.url() === `${URL_}/login` && (await page.textContent("h1")) === "Sign in",
      `signed out, ${p} shows the sign-in page`);
  }
  await page.fill("#token", "gpt_not-a-token");
  await page.press("#token", "Enter");
  check((await page.textContent("p.error")).includes("invalid API token"), "a wrong token is refused on the sign-in page");
  await shot(page, "sign-in");
  await ctx.close();
}

const ctxA = await browser.newContext({ viewport });
const a = await ctxA.newPage();
await signIn(a, TOKEN_A);
check((await a.textContent(".who")).includes("tenant"), "tenant A signed in");

// 2. Create a train pool, keyboard only: type first, then the form.
let poolId;
const poolName = "console-train";
{
  await a.goto(`${URL_}/pools`);
  await tabTo(a, 'a[href="/pools/new"]');
  await a.keyboard.press("Enter");
  await a.waitForURL(`${URL_}/pools/new`);
  await tabTo(a, 'a[href="/pools/new/train"]');
  await a.keyboard.press("Enter");
  await a.waitForURL(`${URL_}/pools/new/train`);
  await tabTo(a, "#name");
  await a.keyboard.type("bad name!");
  await a.waitForSelector("#name-check .error", { timeout: 5000 });
  check((await a.textContent("#name-check")).includes("R-CREATE-4"), "a bad name is refused inline (R-CREATE-4)");
  const sold = a.locator(`#spec option[value="${SOLD_OUT_SPEC}"]`);
  check(await sold.isDisabled(), `the sold-out spec ${SOLD_OUT_SPEC} is disabled`);
  check((await sold.textContent()).includes("sold out"), "the sold-out spec says so");
  let picked = true;
  try { await a.selectOption("#spec", SOLD_OUT_SPEC, { timeout: 1000 }); } catch { picked = false; }
  const value = await a.inputValue("#spec");
  check(!picked || value !== SOLD_OUT_SPEC, "the sold-out spec cannot be picked");
  for (let i = 0; i < 9; i++) await a.keyboard.press("Backspace");
  await a.keyboard.type(poolName);
  await a.waitForSelector("#name-check .ok", { timeout: 5000 });
  check(true, "a good name is accepted inline");
  await noHorizontalScroll(a, "create form");
  await shot(a, "pool-create");
  await tabTo(a, "form.create button[type=submit]");
  await a.keyboard.press("Enter");
  await a.waitForURL(/\/pools\/p-/);
  poolId = a.url().split("/pools/")[1];
  check(poolId.startsWith("p-"), `created pool ${poolId}`);
  await until(a, `${URL_}/pools/${poolId}`, async (p) => (await p.textContent(".titlebar .badge")) === "Running",
    "the pool is Running");
}

// 3. Submit a job into it and follow its log until it succeeds.
let jobId;
{
  await a.click("text=Submit a job here");
  await a.waitForURL(/\/jobs\/new/);
  check((await a.inputValue("#pool")) === poolId, "the submit form names the pool");
  await a.selectOption("#kind", "training");
  await a.fill("#gpus", "1");
  await a.fill("#command", "echo hello-from-console; sleep 3; echo done-console");
  await a.click("form.card button[type=submit]");
  await a.waitForURL(/\/jobs\/j-/);
  jobId = a.url().split("/jobs/")[1];
  await a.waitForFunction(() => document.querySelector("#log-state")?.textContent === "Succeeded"
    && document.querySelector("pre.log")?.textContent.includes("done-console"), null, { timeout: 60000 });
  const log = await a.textContent("pre.log");
  check(log.includes("hello-from-console") && log.includes("done-console"), `job ${jobId}'s log followed until it succeeded`);
  await noHorizontalScroll(a, "job page");
  await shot(a, "job-log");
}

// 4. Scale out, then in (the advisor's pick pre-selected).
{
  await a.goto(`${URL_}/pools/${poolId}`);
  await a.fill("#add", "1");
  await a.click("form[action$='/scale-out'] button[type=submit]");
  await until(a, `${URL_}/pools/${poolId}`, async (p) => (await p.locator("input[name=node]").count()) === 2
    && (await p.textContent(".titlebar .badge")) === "Running", "scaled out to 2 nodes, Running");
  const checked = await a.locator("input[name=node]:checked").count();
  check(checked === 1, "the advisor's node is pre-selected for scale-in");
  await noHorizontalScroll(a, "pool detail");
  await shot(a, "pool-detail");
  await a.click("form[action$='/scale-in'] button[type=submit]");
  await a.waitForLoadState();
  const refused = await a.locator("main > p.error").count();
  check(refused === 0, `scale-in accepted${refused ? ": " + (await a.textContent("main > p.error")) : ""}`);
  await until(a, `${URL_}/pools/${poolId}`, async (p) => (await p.locator("input[name=node]").count()) === 1,
    "scaled in to 1 node");
}

// 5. Convert to a 12-month subscription: 10 months billed (R-CREATE-8).
{
  await a.goto(`${URL_}/pools/${poolId}`);
  await a.selectOption("form[action$='/convert'] select", "12");
  const twelve = await a.textContent("form[action$='/convert'] option[value='12']");
  const one = await a.textContent("form[action$='/convert'] option[value='1']");
  const price = (t) => BigInt(t.match(/: ([0-9]+)\.([0-9]{6}) /).slice(1).join(""));
  check(twelve.includes("billed as 10") && price(twelve) === 10n * price(one),
    `the 12-month option is billed as 10 months (${twelve.trim()}; ${one.trim()})`);
  await a.click("form[action$='/convert'] button[type=submit]");
  await a.waitForSelector("#term");
  check((await a.textContent("#term")).includes("12 months, billed 10"), "the term is 12 months, billed 10");
  check((await a.textContent("table.orders .billed-months")).trim() === "10", "the order bills 10 months");
}

// 6. Another tenant sees none of it.
{
  const ctxB = await browser.newContext({ viewport });
  const b = await ctxB.newPage();
  await signIn(b, TOKEN_B);
  check(!(await b.content()).includes(poolId), "tenant B's pool list does not show A's pool");
  await b.goto(`${URL_}/pools/${poolId}`);
  check((await b.textContent("p.error")).length > 0 && !(await b.content()).includes(poolName),
    "tenant B cannot open A's pool");
  await b.goto(`${URL_}/jobs/${jobId}`);
  check(!(await b.content()).includes("hello-from-console"), "tenant B cannot open A's job");
  await b.goto(`${URL_}/jobs/${jobId}/log`);
  check(!(await b.content()).includes("hello-from-console"), "tenant B cannot read A's log");
  await b.goto(`${URL_}/jobs`);
  check(!(await b.content()).includes(jobId), "tenant B's job list does not show A's job");
  await b.goto(`${URL_}/admin/tenants`);
  check((await b.textContent("p.error")).includes("for the admin only"), "tenant B is refused the tenant list");
  check(!(await b.content()).includes("alpha"), "tenant B does not see tenant A");
  await ctxB.close();
}

// 7. A cross-site form post is refused (A's long job survives it).
{
  await a.goto(`${URL_}/jobs/new?pool=${poolId}`);
  await a.fill("#command", "sleep 600");
  await a.click("form.card button[type=submit]");
  await a.waitForURL(/\/jobs\/j-/);
  const victim = a.url().split("/jobs/")[1];
  const evil = http.createServer((req, res) => {
    res.setHeader("content-type", "text/html");
    res.end(`<form id=f method=post action="${URL_}/jobs/${victim}/cancel"><input name=csrf value=x></form>
      <script>document.getElementById('f').submit()</script>`);
  });
  await new Promise((r) => evil.listen(0, "127.0.0.2", r));
  const evilUrl = `http://127.0.0.2:${evil.address().port}/`;
  let status = 0;
  a.on("response", (r) => { if (r.url().endsWith("/cancel")) status = r.status(); });
  await a.goto(evilUrl);
  await a.waitForTimeout(1500);
  evil.close();
  check(status === 403 || status === 303, `the cross-site post was refused (HTTP ${status})`);
  await a.goto(`${URL_}/jobs/${victim}`);
  const state = await a.textContent(".titlebar .badge");
  check(state !== "Cancelled", `the job it aimed at is still ${state}`);
  await a.click("text=Cancel the job");
  await a.waitForURL(`${URL_}/jobs/${victim}`);
  check(true, "the console's own cancel form works");
}

// 8. Usage and bills: the chart and this month's bill.
{
  await a.goto(`${URL_}/usage`);
  await a.waitForFunction(() => document.querySelector("#usage-chart")?.dataset.drawn === "1", null, { timeout: 10000 });
  check(true, "the usage chart is drawn");
  check((await a.textContent("#usage-by-job")).includes(poolId), "usage lists the pool");
  check((await a.textContent("#bill-total")).length > 0, "the month's bill has a total");
  const csv = await a.evaluate(async () => (await fetch("/usage.csv")).text());
  check(csv.startsWith("day,tenant,pool_id,job_id") && csv.includes(poolId), "the CSV export lists the pool");
  await noHorizontalScroll(a, "usage page");
  await shot(a, "usage");
}

// 9. Delete through the confirmation, keyboard only: a subscription is
// released by unsubscribing (R-DEL-3), its refund shown first.
{
  await a.goto(`${URL_}/pools/${poolId}`);
  await tabTo(a, `a[href="/pools/${poolId}/unsubscribe"]`);
  await a.keyboard.press("Enter");
  await a.waitForURL(`${URL_}/pools/${poolId}/unsubscribe`);
  check((await a.textContent("h1")).includes(poolName), "the confirmation names the pool");
  const refund = await a.textContent("#refund b");
  check(/^[1-9][0-9]*\.[0-9]{6} /.test(refund), `the refund is shown before unsubscribing (${refund})`);
  await shot(a, "pool-unsubscribe");
  await noHorizontalScroll(a, "unsubscribe confirmation");
  await tabTo(a, "#confirm");
  await a.keyboard.type("not-the-name");
  await a.keyboard.press("Enter");
  await a.waitForSelector("main > p.error");
  check((await a.textContent("main > p.error")).includes(poolName), "a wrong name does not unsubscribe");
  await tabTo(a, "#confirm");
  await a.keyboard.type(poolName);
  await tabTo(a, "button.danger[type=submit]");
  await a.keyboard.press("Enter");
  await a.waitForURL(`${URL_}/pools`);
  await until(a, `${URL_}/pools`, async (p) => {
    const row = p.locator(`tr:has(a[href="/pools/${poolId}"])`);
    return (await row.count()) === 0 || (await row.textContent()).includes("Deleting");
  }, "the pool is deleted");
  await shot(a, "pools");
  await noHorizontalScroll(a, "pool list");
}

// 9b. An on-demand pool is deleted through its confirmation.
{
  await a.goto(`${URL_}/pools/new/train`);
  await a.fill("#name", "console-ondemand");
  await a.click("form.create button[type=submit]");
  await a.waitForURL(/\/pools\/p-/);
  const id = a.url().split("/pools/")[1];
  await a.click(`a[href="/pools/${id}/delete"]`);
  await a.waitForURL(`${URL_}/pools/${id}/delete`);
  await a.fill("#confirm", "console-ondemand");
  await a.press("#confirm", "Enter");
  await a.waitForURL(`${URL_}/pools`);
  await until(a, `${URL_}/pools`, async (p) => {
    const row = p.locator(`tr:has(a[href="/pools/${id}"])`);
    return (await row.count()) === 0 || (await row.textContent()).includes("Deleting");
  }, "the on-demand pool is deleted");
}

// 10. The admin's pages.
{
  const ctx = await browser.newContext({ viewport });
  const page = await ctx.newPage();
  await signIn(page, ADMIN_TOKEN);
  await page.goto(`${URL_}/admin/nodes`);
  check((await page.textContent("#utilisation")).includes("GPUs"), "the admin sees the cluster's nodes and GPUs");
  await noHorizontalScroll(page, "nodes page");
  await shot(page, "admin-nodes");
  await page.goto(`${URL_}/admin/tenants`);
  check((await page.content()).includes("alpha"), "the admin sees the tenants");
  await ctx.close();
}

// 11. The cookie holds a session id, not the token; signing out ends the
// session itself (its cookie, replayed, no longer works).
{
  const [c] = (await ctxA.cookies()).filter((c) => c.name === "gpupool_console");
  check(c && c.httpOnly && c.sameSite === "Strict" && c.value.startsWith("gcs_") && c.value !== TOKEN_A,
    "the session cookie is an HttpOnly, SameSite=Strict session id, not the API token");
  await a.goto(`${URL_}/pools`);
  await a.click("header button[type=submit]");
  await a.waitForURL(`${URL_}/login`);
  await a.goto(`${URL_}/pools`);
  check(a.url() === `${URL_}/login`, "after signing out the console asks to sign in again");
  const replay = await browser.newContext({ viewport });
  await replay.addCookies([{ name: c.name, value: c.value, url: URL_ }]);
  const r = await replay.newPage();
  await r.goto(`${URL_}/pools`);
  check(r.url() === `${URL_}/login`, "the signed-out session's cookie, replayed, gets the sign-in page");
  await replay.close();
}

// 12. A page of another host name (a DNS-rebinding site) is refused.
{
  const port = new URL(URL_).port;
  const status = await new Promise((resolve, reject) => {
    http.get({ host: "127.0.0.1", port, path: "/login", headers: { host: `rebound.example:${port}` } },
      (res) => { res.resume(); resolve(res.statusCode); }).on("error", reject);
  });
  check(status === 421, `a request for host rebound.example is refused (HTTP ${status})`);
}

// 13. A client that never finishes its request's headers is cut off.
{
  const port = Number(new URL(URL_).port);
  const started = Date.now();
  const closed = await new Promise((resolve) => {
    const sock = net.connect(port, "127.0.0.1", () => sock.write("GET /login HTTP/1.1\r\nHost: 127.0.0.1\r\n"));
    sock.on("data", () => {});
    sock.on("close", () => resolve(true));
    sock.on("error", () => resolve(true));
    setTimeout(() => { sock.destroy(); resolve(false); }, 20000);
  });
  const secs = ((Date.now() - started) / 1000).toFixed(1);
  check(closed, `a request whose headers never end is closed by the console (after ${secs} s)`);
}

await browser.close();
console.log("all console checks passed");
