// The admin console in headless Chromium: sign-in, live overview, a provider whose name
// is an XSS payload (must show as text, no dialog), a chart with real data, revoking a
// key, creating a campaign through the form, the provider's own view, both viewport
// sizes, and no Content-Security-Policy violation anywhere. Screenshots go to
// $GS_SCREENSHOTS. Started by the Rust test `console::console_in_chromium`, which
// sets up the gateway and passes its coordinates in the environment.

import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { chromium } from 'playwright-core';

function env(name) {
  const v = process.env[name];
  if (!v) throw new Error(`${name} is not set (run through the Rust test console::console_in_chromium)`);
  return v;
}

const BASE = env('GS_URL');
const ADMIN = env('GS_ADMIN_KEY');
const PROVIDER_KEY = env('GS_PROVIDER_KEY');
const PROVIDER_ID = env('GS_PROVIDER_ID');
const PROVIDER_NAME = env('GS_PROVIDER_NAME');
const REVOKE_KEY_ID = env('GS_REVOKE_KEY_ID');
const ADVERTISER_ID = env('GS_ADVERTISER_ID');
const SHOTS = env('GS_SCREENSHOTS');
mkdirSync(SHOTS, { recursive: true });

const CSP = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";
const DESKTOP = { width: 1280, height: 800 };
const PHONE = { width: 375, height: 812 };

const problems = [];
const browser = await chromium.launch({
  executablePath: '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-background-networking'],
});

async function newPage(viewport) {
  const context = await browser.newContext({ viewport, deviceScaleFactor: 1 });
  const page = await context.newPage();
  // Chromium reports a blocked script, style or connection as a console message and a
  // securitypolicyviolation event; either one fails the test.
  await page.addInitScript(() => {
    document.addEventListener('securitypolicyviolation', (e) => console.error(`CSP violation: ${e.violatedDirective} ${e.blockedURI}`));
  });
  page.on('console', (m) => {
    if (/content security policy|csp violation|refused to/i.test(m.text())) problems.push(`${viewport.width}px console: ${m.text()}`);
  });
  page.on('pageerror', (e) => problems.push(`${viewport.width}px page error: ${e.message}`));
  page.on('dialog', async (d) => {
    problems.push(`${viewport.width}px a ${d.type()} dialog fired: ${d.message()}`);
    await d.dismiss();
  });
  return { context, page };
}

/** Saves a screenshot, then checks the page fits its viewport's width. */
async function shot(page, name) {
  const { width, height } = page.viewportSize();
  await page.screenshot({ path: `${SHOTS}/${name}-${width}x${height}.png`, fullPage: true });
  await noHorizontalOverflow(page, `${name} at ${width}px`);
}

async function signIn(page, key) {
  await page.goto(`${BASE}/admin`);
  await page.fill('#key', key);
  await page.click('#signin button[type=submit]');
}

async function noHorizontalOverflow(page, what) {
  const [scroll, client] = await page.evaluate(() => [document.documentElement.scrollWidth, document.documentElement.clientWidth]);
  assert.ok(scroll <= client, `${what}: the page is ${scroll}px wide in a ${client}px viewport`);
}

function step(name) {
  console.log(`- ${name}`);
}

try {
  // --- headers -----------------------------------------------------------------------
  step('console responses carry the CSP, nosniff, content types and cache headers');
  for (const [path, type] of [['/admin', 'text/html'], ['/admin/app.js', 'text/javascript'], ['/admin/style.css', 'text/css']]) {
    const r = await fetch(`${BASE}${path}`);
    assert.equal(r.status, 200, path);
    assert.equal(r.headers.get('content-security-policy'), CSP, path);
    assert.equal(r.headers.get('x-content-type-options'), 'nosniff', path);
    assert.ok(r.headers.get('content-type').startsWith(type), `${path}: ${r.headers.get('content-type')}`);
    assert.equal(r.headers.get('cache-control'), 'no-cache', path);
    const etag = r.headers.get('etag');
    assert.ok(etag, `${path} has an ETag`);
    const again = await fetch(`${BASE}${path}`, { headers: { 'if-none-match': etag } });
    assert.equal(again.status, 304, `${path} revalidates`);
  }
  const denied = await fetch(`${BASE}/api/admin/overview`);
  assert.equal(denied.status, 401, 'the overview needs the admin key');

  // --- desktop, admin --------------------------------------------------------------------
  const { context, page } = await newPage(DESKTOP);
  step('a wrong key is refused');
  await signIn(page, 'not-the-admin-key');
  await page.locator('#signin .notice.error').waitFor();

  step('sign in with the admin key; it is kept in sessionStorage only');
  await page.fill('#key', ADMIN);
  await page.click('#signin button[type=submit]');
  await page.locator('#stat-providers .stat-value').waitFor();
  assert.equal(await page.locator('#stat-providers .stat-value').textContent(), '1 / 1');
  const storage = await page.evaluate(() => ({ session: JSON.stringify(sessionStorage), local: localStorage.length, cookie: document.cookie }));
  assert.ok(storage.session.includes(ADMIN), 'the key is in sessionStorage');
  assert.equal(storage.local, 0, 'nothing in localStorage');
  assert.equal(storage.cookie, '', 'no cookies');
  assert.equal((await context.cookies()).length, 0, 'no cookies in the context');
  assert.notEqual(await page.locator('#stat-revenue .stat-value').textContent(), '$0.00', 'revenue today after the completions');

  step('the overview charts the last hour');
  await page.locator('#chart-activity rect.bar.s0').first().waitFor();
  // The four completions, in whichever minutes they fell.
  const perMinute = await page.locator('#chart-activity rect.bar.s0 title').allTextContents();
  assert.ok(perMinute.every((t) => /^ok, \d\d:\d\d UTC: \d+$/.test(t)), perMinute.join('; '));
  assert.equal(perMinute.reduce((sum, t) => sum + Number(t.split(': ')[1]), 0), 4);

  step('the overview updates itself without a reload');
  const first = await page.locator('#overview-updated').textContent();
  await page.waitForFunction((t) => document.querySelector('#overview-updated')?.textContent !== t, first, { timeout: 10_000 });
  await shot(page, 'overview');

  step('providers: the <script> name is literal text, nothing ran');
  await page.click('#nav a[href="#/providers"]');
  const row = page.locator(`#providers-table tr[data-provider="${PROVIDER_ID}"]`);
  await row.waitFor();
  assert.equal(await row.locator('.provider-name').textContent(), PROVIDER_NAME);
  assert.match(await row.locator('.connection').textContent(), /^http:\/\/127\.0\.0\.1:\d+$/, 'a direct provider shows its baseUrl');
  assert.equal(await page.locator('main script').count(), 0, 'no script element was created from data');
  assert.match(await row.textContent(), /\$0\.0\d*[1-9]/, 'earnings are shown');
  await shot(page, 'providers');

  step('suspend and approve the provider');
  await row.getByRole('button', { name: 'Suspend' }).click();
  await row.locator('.pill.suspended').waitFor();
  await row.getByRole('button', { name: 'Approve' }).click();
  await row.locator('.pill.active').waitFor();
  assert.equal(await row.locator('.status-reason').textContent(), 'approved by an admin', 'the reason is shown beside the status');

  step('usage: the tokens chart has bars, axes and a tooltip');
  await page.click('#nav a[href="#/usage"]');
  const chart = page.locator('#chart-tokens');
  await chart.locator('rect.bar').first().waitFor();
  assert.ok(await chart.locator('rect.bar').count() >= 1);
  assert.ok(await chart.locator('text.tick.y').count() >= 2, 'y axis ticks');
  assert.ok(await chart.locator('text.tick.x').count() >= 2, 'x axis labels');
  assert.equal(await chart.locator('text.axis-title').first().textContent(), 'tokens');
  const bar = await chart.locator('rect.bar').first().boundingBox();
  await page.mouse.move(bar.x + bar.width / 2, bar.y + bar.height / 2);
  await chart.locator('g.tooltip[visibility=visible]').waitFor();
  assert.match(await chart.locator('g.tooltip').textContent(), /mock-model: [1-9]/);
  await page.locator('#chart-revenue rect.bar').first().waitFor();
  await page.locator('#chart-quality rect.bar').first().waitFor();
  assert.match(await page.locator('#chart-quality .legend').textContent(), /standard/);
  step('the date-range picker reloads the charts');
  await page.getByRole('button', { name: '7 days' }).click();
  await page.waitForFunction(() => document.querySelector('#chart-tokens')?.dataset.points === '7' || document.querySelector('#chart-tokens')?.dataset.points === '8');
  await chart.locator('rect.bar').first().waitFor();
  await shot(page, 'usage');

  step('API keys: revoke one (two clicks, no dialog), create one (secret shown once)');
  await page.click('#nav a[href="#/keys"]');
  const keyRow = page.locator(`#keys-table tr[data-key="${REVOKE_KEY_ID}"]`);
  await keyRow.waitFor();
  await keyRow.getByRole('button', { name: 'Revoke' }).click();
  await keyRow.getByRole('button', { name: 'Confirm revoke' }).click();
  await page.locator(`#keys-table tr[data-key="${REVOKE_KEY_ID}"] .pill.revoked`).waitFor();
  await page.fill('#key-name', 'console key');
  await page.fill('#key-form input[name=requestsPerMinute]', '42');
  await page.fill('#key-form input[name=dailyLimit]', '5');
  await page.click('#key-form button[type=submit]');
  assert.match(await page.locator('#new-key-secret').textContent(), /^sk-/);
  const newRow = page.locator('#keys-table tr', { hasText: 'console key' });
  assert.equal(await newRow.locator('.limits').textContent(), '42 req/min · $5.00/day');
  await shot(page, 'keys');

  step('ads: create a campaign through the form');
  await page.click('#nav a[href="#/ads"]');
  await page.locator('#campaign-form').waitFor();
  await page.locator('#campaign-advertiserId').selectOption(ADVERTISER_ID);
  const campaignName = 'Console campaign <img src=x>';
  await page.fill('#campaign-name', campaignName);
  await page.fill('#campaign-title', 'Faster GPUs');
  await page.fill('#campaign-text', 'Rent a GPU by the hour.');
  await page.fill('#campaign-url', 'https://example.com/gpus');
  await page.check('#campaign-form input[value=technology]');
  await page.fill('#campaign-cpmBid', '2.5');
  await page.fill('#campaign-dailyBudget', '10');
  await page.fill('#campaign-totalBudget', '100');
  await page.fill('#campaign-frequencyCap', '3');
  await page.click('#campaign-form button[type=submit]');
  const campaignRow = page.locator('#campaigns-table .campaign-name', { hasText: campaignName });
  await campaignRow.waitFor();
  assert.equal(await campaignRow.textContent(), campaignName);
  const campaigns = await (await fetch(`${BASE}/api/admin/campaigns`, { headers: { authorization: `Bearer ${ADMIN}` } })).json();
  const created = campaigns.data.find((c) => c.name === campaignName);
  assert.ok(created, 'the campaign exists in the API');
  // USD in the named fields, exact micro-USD in the twins.
  assert.equal(created.dailyBudget, 10);
  assert.equal(created.dailyBudgetMicros, 10_000_000);
  assert.equal(created.totalBudget, 100);
  assert.equal(created.totalBudgetMicros, 100_000_000);
  assert.equal(created.cpmBid, 2.5);
  assert.equal(created.cpmBidMicros, 2_500_000);
  assert.equal(created.frequencyCap, 3);
  assert.deepEqual(created.categories, ['technology']);
  step('ads: edit the campaign (pause it, raise its daily budget)');
  await page.locator(`#campaigns-table tr[data-campaign="${created.id}"]`).getByRole('button', { name: 'Edit' }).click();
  await page.locator('#campaign-form h3', { hasText: 'Edit' }).waitFor();
  assert.equal(await page.inputValue('#campaign-dailyBudget'), '10');
  await page.fill('#campaign-dailyBudget', '20');
  await page.locator('#campaign-status').selectOption('paused');
  await page.click('#campaign-form button[type=submit]');
  await page.locator(`#campaigns-table tr[data-campaign="${created.id}"] .pill.paused`).waitFor();
  const edited = await (await fetch(`${BASE}/api/admin/campaigns/${created.id}`, { headers: { authorization: `Bearer ${ADMIN}` } })).json();
  assert.equal(edited.dailyBudgetMicros, 20_000_000);
  assert.equal(edited.status, 'paused');
  assert.equal(edited.totalBudgetMicros, 100_000_000, 'fields not edited are kept');
  await shot(page, 'ads');

  step('payouts: lower the minimum withdrawal through the settings form');
  await page.click('#nav a[href="#/payouts"]');
  await page.locator('#settings-form').waitFor();
  await page.locator('#payouts-table').waitFor();
  await page.fill('#settings-form input[name=minimumWithdrawal]', '0.01');
  await page.click('#settings-form button[type=submit]');
  assert.match(await page.locator('#settings-form .notice.ok').textContent(), /minimum \$0\.01/);

  step('quality levels render');
  await page.click('#nav a[href="#/quality"]');
  await page.locator('#quality-table').waitFor();
  assert.match(await page.locator('#quality-table').textContent(), /ultra/);
  assert.match(await page.locator('#quality-table').textContent(), /reduced allowed/);
  await noHorizontalOverflow(page, 'quality levels at 1280');

  step('sign out forgets the key');
  await page.click('#sign-out');
  await page.locator('#signin').waitFor();
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  await context.close();

  // --- phone, admin ---------------------------------------------------------------------
  step('phone width: pages fit in 375px');
  const phone = await newPage(PHONE);
  await signIn(phone.page, ADMIN);
  await phone.page.locator('#stat-providers .stat-value').waitFor();
  await noHorizontalOverflow(phone.page, 'overview at 375');
  await shot(phone.page, 'overview');
  for (const [hash, ready] of [['#/providers', '#providers-table'], ['#/usage', '#chart-tokens rect.bar'], ['#/ads', '#campaign-form'], ['#/keys', '#keys-table'], ['#/payouts', '#payouts-table']]) {
    await phone.page.goto(`${BASE}/admin${hash}`);
    await phone.page.locator(ready).first().waitFor();
    await shot(phone.page, hash.slice(2));
    await noHorizontalOverflow(phone.page, `${hash} at 375`);
  }
  await phone.context.close();

  // --- provider view ----------------------------------------------------------------------
  for (const viewport of [DESKTOP, PHONE]) {
    step(`provider view at ${viewport.width}px: its own data only`);
    const p = await newPage(viewport);
    await signIn(p.page, PROVIDER_KEY);
    await p.page.locator('#provider-name').waitFor();
    assert.equal(await p.page.locator('#provider-name').textContent(), PROVIDER_NAME);
    assert.match(await p.page.locator('#my-earnings .stat-value').textContent(), /\$0\.0\d*[1-9]/);
    assert.equal(await p.page.locator('#nav a').count(), 1, 'no admin pages for a provider');
    await p.page.locator('#withdrawals-table').waitFor();
    await p.page.locator('#withdraw-method').selectOption('paypal');
    await p.page.fill('#withdraw-detail', 'gpu@example.com');
    if (viewport === DESKTOP) {
      await p.page.fill('#withdraw-amount', '0.01');
      await p.page.click('#withdraw-form button[type=submit]');
      await p.page.locator('#withdraw-form .notice.ok').waitFor();
      await p.page.locator('#withdrawals-table td', { hasText: 'requested' }).waitFor();
    } else {
      // More than it has: the API's refusal is shown.
      await p.page.fill('#withdraw-amount', '1000');
      await p.page.click('#withdraw-form button[type=submit]');
      await p.page.locator('#withdraw-form .notice.error').waitFor();
    }
    const adminCall = await p.page.evaluate(async (key) => (await fetch('/api/admin/overview', { headers: { authorization: `Bearer ${key}` } })).status, PROVIDER_KEY);
    assert.equal(adminCall, 401, 'a provider key cannot call the admin API');
    await shot(p.page, 'provider');
    await noHorizontalOverflow(p.page, `provider view at ${viewport.width}`);
    await p.context.close();
  }

  step('payouts: the admin approves the withdrawal and marks it paid');
  {
    const a = await newPage(DESKTOP);
    await signIn(a.page, ADMIN);
    await a.page.locator('#stat-providers').waitFor();
    await a.page.goto(`${BASE}/admin#/payouts`);
    const w = a.page.locator('#payouts-table tbody tr', { hasText: PROVIDER_ID });
    await w.getByRole('button', { name: 'Approve' }).click();
    await a.page.locator('#payouts-table tbody tr .pill.processing').waitFor();
    await a.page.locator('#payouts-table tbody tr', { hasText: PROVIDER_ID }).getByRole('button', { name: 'Mark paid' }).click();
    await a.page.locator('#payouts-table tbody tr .pill.paid').waitFor();
    await shot(a.page, 'payouts');
    await a.context.close();
  }

  assert.deepEqual(problems, [], 'no CSP violations, page errors or dialogs');
  console.log('console test passed');
} catch (e) {
  console.error(e);
  if (problems.length) console.error('also seen:', problems);
  process.exitCode = 1;
} finally {
  await browser.close();
}
