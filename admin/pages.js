// The admin pages. Everything from the API is shown through text nodes (dom.js), and
// every call carries the admin key from the session (api.js).

import { h, clear, on, notice, table, field, stat, usd, micros, num, pct, ms, time } from './dom.js';
import { api, range } from './api.js';
import { barChart, bucketsFor } from './chart.js';

const DAY = 86_400_000;
const CATEGORIES = ['technology', 'finance', 'health', 'entertainment', 'education'];

function section(title, ...children) {
  return h('section', { class: 'card' }, h('h2', {}, title), ...children);
}

/** A button that runs `fn`, disabled meanwhile; errors land in `status` (or an alert box after the button). */
function action(label, fn, attrs = {}) {
  const button = h('button', { type: 'button', ...attrs }, label);
  on(button, 'click', async () => {
    button.disabled = true;
    try {
      await fn(button);
    } catch (e) {
      const box = notice('error', e.message);
      button.after(box);
    } finally {
      button.disabled = false;
    }
  });
  return button;
}

/** Wires a form: `fn(form)` runs on submit; its result or error shows in the form's status box. */
function onSubmit(form, status, fn) {
  on(form, 'submit', async (event) => {
    event.preventDefault();
    clear(status);
    const submit = form.querySelector('button[type=submit]');
    if (submit) submit.disabled = true;
    try {
      const message = await fn(form);
      if (message) status.append(message instanceof Node ? message : notice('ok', message));
    } catch (e) {
      status.append(notice('error', e.message));
    } finally {
      if (submit) submit.disabled = false;
    }
  });
}

function toMicros(value, name) {
  const v = Number.parseFloat(value);
  if (!Number.isFinite(v) || v < 0) throw new Error(`${name} must be a non-negative USD amount`);
  return Math.round(v * 1e6);
}

function optionalNumber(value) {
  return value === '' ? undefined : Number(value);
}

function pill(text, kind = text) {
  return h('span', { class: `pill ${String(kind).replace(/[^a-z_-]/gi, '')}` }, text);
}

// --- Overview -------------------------------------------------------------------------

async function overview(root, ctx) {
  const updated = h('p', { class: 'muted', id: 'overview-updated' }, 'Loading…');
  const grid = h('div', { class: 'stats', id: 'overview-stats' });
  const status = h('div', {});
  const activity = h('div', { class: 'charts' });
  root.append(h('h1', {}, 'Overview'), updated, grid, status, activity);
  const minute = (t, short) => {
    const d = new Date(t);
    const hm = `${String(d.getUTCHours()).padStart(2, '0')}:${String(d.getUTCMinutes()).padStart(2, '0')}`;
    return short ? hm : `${hm} UTC`;
  };
  const tick = async () => {
    if (!ctx.live()) return;
    try {
      const o = await api('/api/admin/overview');
      if (!ctx.live()) return;
      clear(status);
      clear(grid).append(
        stat('Providers online', `${num(o.providers.online)} / ${num(o.providers.total)}`, { id: 'stat-providers' }),
        stat('Active streams', num(o.activeStreams), { id: 'stat-streams' }),
        stat('Queue', num(o.queued), { id: 'stat-queue' }),
        stat('Requests / s (last minute)', o.requestsPerSecond.toFixed(2), { id: 'stat-rps' }),
        stat('Error rate (last 5 min)', pct(o.errorRate), { id: 'stat-errors' }),
        stat('Revenue today (fees + ads)', usd(o.today.revenue), { id: 'stat-revenue' }),
        stat('Billed today', usd(o.today.billed)),
        stat('Requests today', num(o.today.requests)),
        stat('Tokens today', num(o.today.tokens)),
        stat('Pending providers', num(o.providers.pending)),
        stat('Open withdrawals', num(o.pendingPayouts)),
        stat('HTTP 5xx since start', `${num(o.http.serverErrors)} of ${num(o.http.requests)}`),
      );
      const start = Math.floor(o.at / 60_000) * 60_000 - 59 * 60_000;
      const minutes = Array.from({ length: 60 }, (_, i) => start + i * 60_000);
      const ok = minutes.map(() => 0);
      const failed = minutes.map(() => 0);
      for (const p of o.lastHour) {
        const i = (p.t - start) / 60_000;
        if (i >= 0 && i < 60) { ok[i] = p.requests - p.errors; failed[i] = p.errors; }
      }
      clear(activity).append(barChart({
        id: 'chart-activity', title: 'Requests per minute, last hour', unit: 'requests', buckets: minutes, bucketMs: 60_000,
        series: [{ name: 'ok', values: ok }, { name: 'failed', values: failed }], format: num, label: minute,
      }));
      updated.textContent = `Updated ${new Date(o.at).toLocaleTimeString()} · refreshes every 3 s`;
    } catch (e) {
      if (e.status === 401) {
        window.dispatchEvent(new Event('gs:unauthorized'));
        return;
      }
      clear(status).append(notice('error', e.message));
    }
    if (ctx.live()) setTimeout(tick, 3000);
  };
  await tick();
}

// --- Providers ------------------------------------------------------------------------

async function providers(root) {
  const body = h('div', {});
  root.append(h('h1', {}, 'Providers'), h('div', { class: 'toolbar' }, action('Refresh', () => load())), body);
  async function load() {
    const [list, earnings] = await Promise.all([api('/api/admin/providers'), api('/api/admin/providers/earnings')]);
    const byId = new Map(earnings.data.map((e) => [e.providerId, e]));
    const rows = list.data.map((p) => {
      const e = byId.get(p.id) || {};
      const health = p.health || {};
      const buttons = h('div', { class: 'row-actions' },
        p.status !== 'active' ? action('Approve', async () => { await api(`/api/admin/providers/${encodeURIComponent(p.id)}/approve`, { method: 'POST' }); await load(); }, { class: 'small' }) : null,
        p.status !== 'suspended' ? action('Suspend', async () => { await api(`/api/admin/providers/${encodeURIComponent(p.id)}/suspend`, { method: 'POST' }); await load(); }, { class: 'small danger' }) : null);
      return {
        attrs: { dataset: { provider: p.id } },
        cells: [
          h('div', {}, h('strong', { class: 'provider-name' }, p.name), h('div', { class: 'muted mono' }, p.id),
            h('div', { class: 'muted connection' }, p.connection === 'dialOut' ? 'dial-out link' : p.baseUrl)),
          h('div', {}, pill(p.status), ' ', p.online ? pill('online', 'ok') : pill('offline', 'off'),
            p.probationRemaining > 0 ? h('div', { class: 'muted probation' }, `probation: ${num(p.probationRemaining)} requests to go`) : null,
            p.statusReason ? h('div', { class: 'muted status-reason' }, p.statusReason) : null),
          num(p.score),
          pct(health.uptime),
          ms(health.ttftMs),
          h('div', {}, `${num(p.activeRequests)} active`, h('div', { class: 'muted' }, p.streams.map((st) => `${st.model}:${st.quality}`).join(', ') || 'no streams')),
          h('div', {}, usd(e.earnings), h('div', { class: 'muted' }, `balance ${usd(e.balance)}`)),
          buttons,
        ],
      };
    });
    clear(body).append(table(['Provider', 'Status', 'Score', 'Uptime', 'Latency (TTFT)', 'Streams', 'Earnings', ''], rows, { id: 'providers-table' }));
  }
  await load();
}

// --- Usage and revenue ------------------------------------------------------------------

function dateInput(ms_) {
  return new Date(ms_).toISOString().slice(0, 10);
}

async function usage(root, ctx) {
  const now = Date.now();
  let from = now - DAY;
  let to = now + 1;
  const fromInput = h('input', { type: 'date', id: 'range-from', value: dateInput(from) });
  const toInput = h('input', { type: 'date', id: 'range-to', value: dateInput(now) });
  const out = h('div', {});
  const picker = h('form', { class: 'toolbar range', id: 'range-form' },
    field('From (UTC)', fromInput), field('To (UTC, inclusive)', toInput),
    h('button', { type: 'submit', class: 'primary' }, 'Apply'),
    h('span', { class: 'presets' },
      action('24 h', () => preset(DAY)), action('7 days', () => preset(7 * DAY)), action('30 days', () => preset(30 * DAY))));
  on(picker, 'submit', (event) => {
    event.preventDefault();
    const f = Date.parse(`${fromInput.value}T00:00:00Z`);
    const t = Date.parse(`${toInput.value}T00:00:00Z`) + DAY;
    if (!Number.isFinite(f) || !Number.isFinite(t) || t <= f) {
      clear(out).append(notice('error', 'Pick a start date on or before the end date.'));
      return;
    }
    from = f;
    to = t;
    load().catch((e) => clear(out).append(notice('error', e.message)));
  });
  function preset(span) {
    to = Date.now() + 1;
    from = to - span;
    fromInput.value = dateInput(from);
    toInput.value = dateInput(to);
    return load();
  }
  root.append(h('h1', {}, 'Usage and revenue'), picker, out);

  async function load() {
    const q = range(from, to);
    const [rev, use] = await Promise.all([api(`/api/analytics/revenue?${q}`), api(`/api/analytics/usage?${q}`)]);
    if (!ctx.live()) return;
    const bucketMs = use.series.bucketMs;
    const buckets = bucketsFor(from, to, bucketMs);
    const index = new Map(buckets.map((t, i) => [t, i]));
    const zeros = () => buckets.map(() => 0);
    const sources = [
      ['Platform fees', 'fees'], ['Ad revenue (net)', 'ads'], ['Billed to users', 'billedUsers'], ['Billed to ads (free tier)', 'billedAdFunded'],
    ].map(([name, k]) => {
      const values = zeros();
      for (const p of rev.series.data) if (index.has(p.t)) values[index.get(p.t)] += p[k];
      return { name, values };
    });
    const grouped = (points, key, value) => {
      const m = new Map();
      for (const p of points) {
        if (!index.has(p.t)) continue;
        if (!m.has(p[key])) m.set(p[key], zeros());
        m.get(p[key])[index.get(p.t)] += p[value];
      }
      return [...m.entries()].map(([name, values]) => ({ name, values }));
    };
    const money = (v) => usd(v);
    const tokens = use.promptTokens + use.completionTokens;
    clear(out).append(
      h('div', { class: 'stats' },
        stat('Requests', num(use.requests)), stat('Tokens', num(tokens)), stat('Error rate', pct(use.errorRate)),
        stat('Platform fees', usd(rev.total.fees)), stat('Active providers', num(use.activeProviders))),
      h('div', { class: 'charts' },
        barChart({ id: 'chart-revenue', title: 'Revenue by source', unit: 'USD', buckets, bucketMs, series: sources, format: money, grouped: true }),
        barChart({ id: 'chart-tokens', title: 'Tokens by model', unit: 'tokens', buckets, bucketMs, series: grouped(use.series.tokensByModel, 'model', 'tokens'), format: num }),
        barChart({ id: 'chart-quality', title: 'Requests by quality tier', unit: 'requests', buckets, bucketMs, series: grouped(use.series.requestsByQuality, 'quality', 'requests'), format: num })),
      section('By model and tier', table(['Model', 'Tier', 'Requests', 'Prompt tokens', 'Completion tokens', 'Errors'],
        use.byModelAndQuality.map((r) => [r.model, r.quality, num(r.requests), num(r.promptTokens), num(r.completionTokens), num(r.errors)]))),
      section('Spend by provider', table(['Provider', 'Requests', 'Billed'], rev.byProvider.map((r) => [r.key, num(r.requests), usd(r.spend)]))));
  }
  await load();
}

// --- Ads --------------------------------------------------------------------------------

function localInput(msValue) {
  if (typeof msValue !== 'number') return '';
  const d = new Date(msValue);
  return new Date(msValue - d.getTimezoneOffset() * 60_000).toISOString().slice(0, 16);
}

async function ads(root) {
  const summary = h('div', {});
  const advertisersBox = h('div', {});
  const campaignsBox = h('div', {});
  const formBox = h('div', {});
  root.append(h('h1', {}, 'Ads'),
    section('Last 30 days', summary),
    section('Campaigns', campaignsBox),
    section('Campaign', formBox),
    section('Advertisers', advertisersBox));
  let advertisers = [];

  async function loadSummary() {
    const to = Date.now() + 1;
    try {
      const a = await api(`/api/analytics/ads?${range(to - 30 * DAY, to)}`);
      clear(summary).append(
        h('div', { class: 'stats' },
          stat('Impressions', num(a.impressions)), stat('Clicks', num(a.clicks)), stat('CTR', pct(a.ctr)), stat('Ad revenue', micros(a.revenueMicros)),
          stat('Free tier: provider cost', micros(a.freeTier?.providerCostMicros)), stat('Free tier: ad revenue', micros(a.freeTier?.adRevenueMicros))),
        table(['Category', 'Impressions', 'Clicks', 'Revenue'], (a.byCategory || []).map((c) => [c.category, num(c.impressions), num(c.clicks), micros(c.revenueMicros)])));
    } catch (e) {
      if (e.status === 401) throw e;
      clear(summary).append(notice('error', `Ad analytics: ${e.message}`));
    }
  }

  async function loadAdvertisers() {
    try {
      advertisers = (await api('/api/admin/advertisers')).data;
    } catch (e) {
      if (e.status === 401) throw e;
      clear(advertisersBox).append(notice('error', `Advertisers: ${e.message}`), advertiserForms());
      return;
    }
    clear(advertisersBox).append(
      table(['Advertiser', 'Balance', 'Held', 'Available', 'Created'], advertisers.map((a) => [
        h('div', {}, h('strong', {}, a.name), h('div', { class: 'muted mono' }, a.id)),
        micros(a.balance?.postedMicros), micros(a.balance?.heldMicros), micros(a.balance?.availableMicros), time(a.createdAt)]), { id: 'advertisers-table' }),
      advertiserForms());
  }

  function advertiserForms() {
    const name = h('input', { name: 'name', required: true, maxlength: 200 });
    const status = h('div', {});
    const create = h('form', { class: 'inline-form', id: 'advertiser-form' }, field('New advertiser', name), h('button', { type: 'submit' }, 'Create'), status);
    onSubmit(create, status, async () => {
      const a = await api('/api/admin/advertisers', { method: 'POST', body: { name: name.value.trim() } });
      await loadAdvertisers();
      await loadCampaigns();
      return `Created advertiser ${a.name}.`;
    });
    const who = h('select', { name: 'advertiser', required: true }, advertisers.map((a) => h('option', { value: a.id }, a.name)));
    const amount = h('input', { name: 'amount', type: 'number', min: '0.01', step: '0.01', required: true });
    const note = h('input', { name: 'note', maxlength: 200 });
    const creditStatus = h('div', {});
    const credit = h('form', { class: 'inline-form', id: 'credit-form' },
      field('Credit advertiser', who), field('Amount (USD)', amount), field('Note', note), h('button', { type: 'submit' }, 'Credit'), creditStatus);
    onSubmit(credit, creditStatus, async () => {
      await api(`/api/admin/advertisers/${encodeURIComponent(who.value)}/credit`, {
        method: 'POST', body: { amountMicros: toMicros(amount.value, 'Amount'), note: note.value.trim() || undefined },
      });
      await loadAdvertisers();
      return 'Credited.';
    });
    return h('div', {}, create, advertisers.length ? credit : null);
  }

  async function loadCampaigns() {
    let campaigns;
    try {
      campaigns = (await api('/api/admin/campaigns')).data;
    } catch (e) {
      if (e.status === 401) throw e;
      clear(campaignsBox).append(notice('error', `Campaigns: ${e.message}`));
      clear(formBox).append(campaignForm(null));
      return;
    }
    const names = new Map(advertisers.map((a) => [a.id, a.name]));
    clear(campaignsBox).append(table(['Campaign', 'Status', 'Categories', 'Impressions', 'Clicks', 'CTR', 'Spend', 'Budget (daily / total)', ''],
      campaigns.map((c) => ({
        attrs: { dataset: { campaign: c.id } },
        cells: [
          h('div', {}, h('strong', { class: 'campaign-name' }, c.name), h('div', { class: 'muted' }, names.get(c.advertiserId) || c.advertiserId)),
          pill(c.status), (c.categories || []).join(', '),
          num(c.stats?.impressions), num(c.stats?.clicks), pct(c.stats?.ctr), micros(c.stats?.spendMicros),
          `${micros(c.dailyBudgetMicros)} / ${micros(c.totalBudgetMicros)}`,
          action('Edit', () => { clear(formBox).append(campaignForm(c)); formBox.scrollIntoView({ block: 'nearest' }); }, { class: 'small' }),
        ],
      })), { id: 'campaigns-table' }));
    if (!formBox.firstChild) formBox.append(campaignForm(null));
  }

  function campaignForm(c) {
    const input = (name, attrs = {}) => h('input', { name, id: `campaign-${name}`, ...attrs });
    const advertiser = h('select', { name: 'advertiserId', id: 'campaign-advertiserId', required: true, disabled: Boolean(c) },
      advertisers.map((a) => h('option', { value: a.id, selected: c?.advertiserId === a.id }, a.name)));
    const name = input('name', { required: true, maxlength: 200, value: c?.name ?? '' });
    const title = input('title', { required: true, maxlength: 120, value: c?.title ?? '' });
    const text = h('textarea', { name: 'text', id: 'campaign-text', required: true, maxlength: 500, rows: 3 }, c?.text ?? '');
    const url = input('url', { type: 'url', required: true, value: c?.url ?? '', placeholder: 'https://' });
    const dollars = (v) => (typeof v === 'number' ? String(v / 1e6) : '');
    const cpm = input('cpmBid', { type: 'number', min: '0', step: '0.0001', value: dollars(c?.cpmBidMicros) });
    const cpc = input('cpcBid', { type: 'number', min: '0', step: '0.0001', value: dollars(c?.cpcBidMicros) });
    const daily = input('dailyBudget', { type: 'number', min: '0', step: '0.01', required: true, value: dollars(c?.dailyBudgetMicros) });
    const total = input('totalBudget', { type: 'number', min: '0', step: '0.01', required: true, value: dollars(c?.totalBudgetMicros) });
    const starts = input('startsAt', { type: 'datetime-local', value: localInput(c?.startsAt) });
    const ends = input('endsAt', { type: 'datetime-local', value: localInput(c?.endsAt) });
    const cap = input('frequencyCap', { type: 'number', min: '1', step: '1', value: c?.frequencyCap ?? '' });
    const status = h('select', { name: 'status', id: 'campaign-status' },
      ['active', 'paused'].map((v) => h('option', { value: v, selected: (c?.status ?? 'active') === v }, v)));
    const cats = CATEGORIES.map((cat) => h('label', { class: 'check' },
      h('input', { type: 'checkbox', name: 'categories', value: cat, checked: (c?.categories || []).includes(cat) }), cat));
    const result = h('div', {});
    const form = h('form', { class: 'grid-form', id: 'campaign-form' },
      h('h3', {}, c ? `Edit ${c.name}` : 'New campaign'),
      field('Advertiser', advertiser), field('Name', name), field('Ad title', title), field('Ad text', text), field('Link URL', url),
      h('fieldset', { class: 'categories' }, h('legend', {}, 'Categories'), cats),
      field('CPM bid (USD per 1000 impressions)', cpm), field('CPC bid (USD per click)', cpc),
      field('Daily budget (USD)', daily), field('Total budget (USD)', total),
      field('Starts (your local time)', starts, 'Empty: now'), field('Ends (your local time)', ends, 'Empty: no end'),
      field('Frequency cap (ads per user per day)', cap, 'Empty: no cap'), field('Status', status),
      h('div', { class: 'form-actions' }, h('button', { type: 'submit', class: 'primary' }, c ? 'Save changes' : 'Create campaign'),
        c ? action('Cancel', () => { clear(formBox).append(campaignForm(null)); }) : null),
      result);
    onSubmit(form, result, async () => {
      const categories = cats.map((l) => l.querySelector('input')).filter((i) => i.checked).map((i) => i.value);
      if (!categories.length) throw new Error('Pick at least one category.');
      const when = (el) => (el.value ? new Date(el.value).getTime() : null);
      const body = {
        name: name.value.trim(), categories, title: title.value.trim(), text: text.value.trim(), url: url.value.trim(),
        // Exact micro-USD twins of the USD fields (the API takes either).
        cpmBidMicros: cpm.value === '' ? undefined : toMicros(cpm.value, 'CPM bid'),
        cpcBidMicros: cpc.value === '' ? undefined : toMicros(cpc.value, 'CPC bid'),
        dailyBudgetMicros: toMicros(daily.value, 'Daily budget'), totalBudgetMicros: toMicros(total.value, 'Total budget'),
        startsAt: when(starts), endsAt: when(ends), status: status.value,
        frequencyCap: cap.value === '' ? null : Number(cap.value),
      };
      if (body.cpmBidMicros === undefined && body.cpcBidMicros === undefined) throw new Error('Set a CPM bid, a CPC bid, or both.');
      let saved;
      if (c) {
        saved = await api(`/api/admin/campaigns/${encodeURIComponent(c.id)}`, { method: 'PATCH', body });
      } else {
        if (!advertiser.value) throw new Error('Create an advertiser first.');
        saved = await api('/api/admin/campaigns', { method: 'POST', body: { advertiserId: advertiser.value, ...body } });
      }
      await loadCampaigns();
      if (!c) form.reset();
      return `${c ? 'Saved' : 'Created'} campaign ${saved.name}.`;
    });
    return form;
  }

  await Promise.all([loadSummary(), loadAdvertisers()]);
  await loadCampaigns();
}

// --- Payouts ----------------------------------------------------------------------------

async function payouts(root) {
  const settingsBox = h('div', {});
  const listBox = h('div', {});
  const filter = h('select', { id: 'payout-filter' },
    [['', 'All'], ['requested', 'Requested'], ['processing', 'Processing'], ['paid', 'Paid'], ['failed', 'Failed']].map(([v, t]) => h('option', { value: v }, t)));
  on(filter, 'change', () => loadList().catch((e) => clear(listBox).append(notice('error', e.message))));
  root.append(h('h1', {}, 'Payouts'),
    section('Withdrawals', h('div', { class: 'toolbar' }, field('Show', filter),
      action('Run auto payouts', async (b) => { const r = await api('/api/admin/payouts/auto', { method: 'POST' }); b.after(notice('ok', `${r.data.length} automatic payout(s) created.`)); await loadList(); })), listBox),
    section('Settings', settingsBox));

  async function transition(w, to, reason) {
    await api(`/api/admin/payouts/${encodeURIComponent(w.id)}/${to}`, { method: 'POST', body: reason ? { reason } : {} });
    await loadList();
  }

  async function loadList() {
    const q = filter.value ? `?status=${encodeURIComponent(filter.value)}` : '';
    const list = (await api(`/api/admin/payouts${q}`)).data;
    clear(listBox).append(table(['Withdrawal', 'Provider', 'Amount', 'Fee', 'Net', 'Method', 'Status', 'Created', ''], list.map((w) => {
      const reason = h('input', { placeholder: 'reason', class: 'reason', maxlength: 200, 'aria-label': 'failure reason' });
      const open = w.status === 'requested' || w.status === 'processing';
      return {
        attrs: { dataset: { withdrawal: w.id } },
        cells: [h('span', { class: 'mono' }, w.id), h('span', { class: 'mono' }, w.providerId), usd(w.amount), usd(w.fee), usd(w.net),
          w.method?.type || '–', h('div', {}, pill(w.status), w.failureReason ? h('div', { class: 'muted' }, w.failureReason) : null), time(w.createdAt),
          open ? h('div', { class: 'row-actions' },
            w.status === 'requested' ? action('Approve', () => transition(w, 'processing'), { class: 'small' }) : null,
            action('Mark paid', () => transition(w, 'paid'), { class: 'small' }),
            reason, action('Mark failed', () => transition(w, 'failed', reason.value.trim() || 'rejected by the admin'), { class: 'small danger' })) : ''],
      };
    }), { id: 'payouts-table' }));
  }

  async function loadSettings() {
    const s = await api('/api/admin/settings');
    const min = h('input', { type: 'number', min: '0.01', step: '0.01', name: 'minimumWithdrawal', value: s.minimumWithdrawal });
    const auto = h('input', { type: 'number', min: '0.01', step: '0.01', name: 'autoPayoutThreshold', value: s.autoPayoutThreshold });
    const fee = h('input', { type: 'number', min: '0', max: '50', step: '0.01', name: 'processingFee', value: s.processingFee });
    const status = h('div', {});
    const form = h('form', { class: 'inline-form', id: 'settings-form' },
      field('Minimum withdrawal (USD)', min), field('Auto-payout threshold (USD)', auto), field('Processing fee (%)', fee),
      h('button', { type: 'submit', class: 'primary' }, 'Save'), status);
    onSubmit(form, status, async () => {
      const saved = await api('/api/admin/settings', { method: 'PATCH', body: {
        minimumWithdrawal: Number(min.value), autoPayoutThreshold: Number(auto.value), processingFee: Number(fee.value) } });
      return `Saved: minimum ${usd(saved.minimumWithdrawal)}, auto payouts from ${usd(saved.autoPayoutThreshold)}, fee ${saved.processingFee}%.`;
    });
    clear(settingsBox).append(form);
  }

  await Promise.all([loadList(), loadSettings()]);
}

// --- API keys ---------------------------------------------------------------------------

async function keys(root) {
  const listBox = h('div', {});
  const name = h('input', { name: 'name', required: true, maxlength: 200, id: 'key-name' });
  const tier = h('select', { name: 'tier', id: 'key-tier' }, h('option', { value: 'free' }, 'free (ads)'), h('option', { value: 'premium' }, 'premium (prepaid, no ads)'));
  const user = h('input', { name: 'userId', placeholder: 'new user', maxlength: 200 });
  const rpm = h('input', { type: 'number', min: '1', step: '1', name: 'requestsPerMinute', placeholder: 'tier default' });
  const tpm = h('input', { type: 'number', min: '1', step: '1', name: 'tokensPerMinute', placeholder: 'tier default' });
  const daily = h('input', { type: 'number', min: '0', step: '0.01', name: 'dailyLimit', placeholder: 'none' });
  const monthly = h('input', { type: 'number', min: '0', step: '0.01', name: 'monthlyLimit', placeholder: 'none' });
  const status = h('div', {});
  const form = h('form', { class: 'grid-form', id: 'key-form' },
    field('Name', name), field('Tier', tier), field('User id', user, 'Empty: a new user'),
    field('Requests per minute', rpm), field('Tokens per minute', tpm),
    field('Daily spending limit (USD)', daily), field('Monthly spending limit (USD)', monthly),
    h('div', { class: 'form-actions' }, h('button', { type: 'submit', class: 'primary' }, 'Create key')), status);
  onSubmit(form, status, async () => {
    const created = await api('/api/admin/keys', { method: 'POST', body: {
      name: name.value.trim(), tier: tier.value, userId: user.value.trim() || undefined,
      requestsPerMinute: optionalNumber(rpm.value), tokensPerMinute: optionalNumber(tpm.value),
      dailyLimit: optionalNumber(daily.value), monthlyLimit: optionalNumber(monthly.value) } });
    await load();
    const secret = h('code', { id: 'new-key-secret' }, created.key);
    return notice('ok', h('p', {}, `Key ${created.name} created for user ${created.userId}. Copy the secret now; it is not shown again:`),
      h('div', { class: 'secret' }, secret, action('Copy', async (b) => { await navigator.clipboard.writeText(created.key); b.textContent = 'Copied'; }, { class: 'small' })));
  });
  root.append(h('h1', {}, 'API keys'), section('New key', form), section('Keys', listBox));

  async function load() {
    const list = (await api('/api/admin/keys')).data;
    clear(listBox).append(table(['Key', 'Prefix', 'Tier', 'Limits', 'User', 'Created', 'Status', ''], list.map((k) => {
      let armed = false;
      const revoke = action('Revoke', async (b) => {
        // Two clicks instead of a confirm() dialog.
        if (!armed) { armed = true; b.textContent = 'Confirm revoke'; return; }
        await api(`/api/admin/keys/${encodeURIComponent(k.id)}/revoke`, { method: 'POST' });
        await load();
      }, { class: 'small danger' });
      return {
        attrs: { dataset: { key: k.id } },
        cells: [h('div', {}, h('strong', {}, k.name), h('div', { class: 'muted mono' }, k.id)), h('span', { class: 'mono' }, `${k.prefix}…`), k.tier,
          h('span', { class: 'limits' }, limitsText(k)), h('span', { class: 'mono' }, k.userId), time(k.createdAt),
          k.revokedAt ? pill('revoked', 'revoked') : pill('active'), k.revokedAt ? '' : revoke],
      };
    }), { id: 'keys-table' }));
  }
  await load();
}

/** A key's own limits in one line; what it does not set follows the tier's defaults. */
function limitsText(k) {
  const parts = [];
  if (k.requestsPerMinute != null) parts.push(`${k.requestsPerMinute} req/min`);
  if (k.tokensPerMinute != null) parts.push(`${k.tokensPerMinute} tok/min`);
  if (k.dailyLimitMicros != null) parts.push(`$${(k.dailyLimitMicros / 1e6).toFixed(2)}/day`);
  if (k.monthlyLimitMicros != null) parts.push(`$${(k.monthlyLimitMicros / 1e6).toFixed(2)}/month`);
  return parts.length ? parts.join(' · ') : 'tier defaults';
}

// --- Quality levels -----------------------------------------------------------------------

async function quality(root) {
  const listBox = h('div', {});
  const input = (n, attrs) => h('input', { name: n, required: true, ...attrs });
  const name = input('name', { maxlength: 64, pattern: '[a-z0-9_-]+', title: 'lower-case letters, digits, - and _' });
  const mult = input('multiplier', { type: 'number', step: '0.01', min: '0.01', value: '1' });
  const lat = input('latencyMultiplier', { type: 'number', step: '0.01', min: '0.01', value: '1' });
  const cost = input('costMultiplier', { type: 'number', step: '0.01', min: '0.01', value: '1' });
  const max = input('maxTokens', { type: 'number', step: '1', min: '1', value: '4096' });
  const status = h('div', {});
  const form = h('form', { class: 'grid-form', id: 'quality-form' },
    field('Name', name), field('Multiplier', mult), field('Latency multiplier', lat), field('Cost multiplier', cost), field('Max tokens', max),
    h('div', { class: 'form-actions' }, h('button', { type: 'submit', class: 'primary' }, 'Add level')), status);
  onSubmit(form, status, async () => {
    const l = await api('/api/admin/quality-levels', { method: 'POST', body: {
      name: name.value.trim(), multiplier: Number(mult.value), latencyMultiplier: Number(lat.value), costMultiplier: Number(cost.value), maxTokens: Number(max.value) } });
    await load();
    return `Added ${l.name}.`;
  });
  root.append(h('h1', {}, 'Quality levels'), section('Levels', listBox), section('Add a custom level', form));
  async function load() {
    const list = (await api('/api/admin/quality-levels')).data;
    clear(listBox).append(table(['Level', 'Multiplier', 'Latency ×', 'Cost ×', 'Max tokens', 'Priority', 'Min provider score', 'Precision', ''], list.map((l) => [
      h('strong', {}, l.name), num(l.multiplier), num(l.latencyMultiplier), num(l.costMultiplier), num(l.maxTokens), num(l.priority),
      l.minProviderScore == null ? '–' : num(l.minProviderScore), l.precision === 'full' ? 'full' : 'reduced allowed',
      l.custom ? pill('custom') : pill('built-in', 'builtin')]), { id: 'quality-table' }));
  }
  await load();
}

export const ADMIN_PAGES = [
  { path: 'overview', title: 'Overview', render: overview },
  { path: 'providers', title: 'Providers', render: providers },
  { path: 'usage', title: 'Usage & revenue', render: usage },
  { path: 'ads', title: 'Ads', render: ads },
  { path: 'payouts', title: 'Payouts', render: payouts },
  { path: 'keys', title: 'API keys', render: keys },
  { path: 'quality', title: 'Quality levels', render: quality },
];
