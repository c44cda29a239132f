// Drives the gateway's /compare/ui page in Debian's Chromium as an SRE would: the endpoints,
// the most differing one, its fields, then the samples of one field. Prints what each view
// showed as one JSON line for tests/compare.rs to check.
//
// Usage: node ui.mjs <admin base URL, or a static report (file:///...html)> <field to open> [screenshot.png]

import { chromium } from "playwright-core";

const [base, field, screenshot] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  // The machine's network is closed: no background connections, no sandbox (root in CI).
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const shown = {};
  await page.goto(base.endsWith(".html") ? base : base + "/compare/ui");
  await page.waitForSelector("table.endpoints tr.row");
  shown.endpoints = await page.$$eval("table.endpoints tr.row", (rows) =>
    rows.map((r) => [r.dataset.endpoint, r.querySelector(".differing-rate").textContent]));

  await page.click("table.endpoints tr.row >> nth=0");
  await page.waitForSelector("table.fields tr.row");
  shown.fields = await page.$$eval("table.fields tr.row", (rows) =>
    rows.map((r) => [r.dataset.field, r.querySelector(".badge").textContent]));
  shown.roles = await page.textContent("#roles");
  if (screenshot) await page.screenshot({ path: screenshot, fullPage: true });

  await page.click(`table.fields tr.row[data-field="${field}"]`);
  await page.waitForSelector(".card.sample");
  shown.samples = await page.$$eval(".card.sample", (cards) => cards.map((c) => ({
    title: c.querySelector("h2").textContent,
    differences: [...c.querySelectorAll(".diffs code")].map((d) => d.textContent),
    candidate: c.querySelector(".candidate pre.body").textContent,
    primary: c.querySelector(".primary pre.body").textContent,
  })));
  shown.crumbs = await page.textContent("#crumbs");

  // Back to every route, by the crumbs.
  await page.click("#crumbs a >> nth=0");
  await page.waitForSelector("table.endpoints tr.row");
  shown.back = await page.evaluate(() => location.hash);
  console.log(JSON.stringify(shown));
} finally {
  await browser.close();
}
