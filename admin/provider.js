// The provider's own view: signed in with its provider key (pk-…), it sees only what
// the provider-key routes return for itself, and can request a withdrawal.

import { h, clear, on, notice, table, field, stat, usd, num, pct, ms, time } from './dom.js';
import { api } from './api.js';

export async function providerPage(root, ctx) {
  const head = h('div', {});
  const stats = h('div', { class: 'stats', id: 'provider-stats' });
  const withdrawBox = h('div', {});
  const historyBox = h('div', {});
  const txBox = h('div', {});
  root.append(head, stats,
    h('section', { class: 'card' }, h('h2', {}, 'Request a withdrawal'), withdrawBox),
    h('section', { class: 'card' }, h('h2', {}, 'Payout history'), historyBox),
    h('section', { class: 'card' }, h('h2', {}, 'Ledger'), txBox));

  let me = await api('/api/gpu/me');
  const id = encodeURIComponent(me.id);

  async function refresh() {
    me = await api('/api/gpu/me');
    const [balance, withdrawals, tx] = await Promise.all([
      api(`/api/payment/balance/${id}`), api(`/api/payment/withdrawals/${id}`), api(`/api/payment/transactions/${id}?limit=20`)]);
    if (!ctx.live()) return;
    clear(head).append(h('h1', {}, h('span', { id: 'provider-name' }, me.name)),
      h('p', { class: 'muted' }, h('span', { class: 'mono' }, me.id), ' · ', me.status, me.online ? ' · online' : ' · offline'));
    clear(stats).append(
      stat('Earnings (lifetime)', usd(me.earnings), { id: 'my-earnings' }),
      stat('Balance', usd(balance.balance)), stat('Available', usd(balance.available)),
      stat('Score', num(me.score)), stat('Latency (TTFT)', ms(me.latencyMs)), stat('Uptime', pct(me.uptime)),
      stat('Success rate', pct(me.successRate)), stat('Active requests', num(me.activeRequests)),
      stat('Streams', me.streams.map((s) => `${s.model}:${s.quality}`).join(', ') || 'none', { class: 'stat text' }));
    clear(historyBox).append(table(['Withdrawal', 'Amount', 'Fee', 'Net', 'Status', 'Requested', 'Updated'], withdrawals.data.map((w) => [
      h('span', { class: 'mono' }, w.id), usd(w.amount), usd(w.fee), usd(w.net), w.status + (w.failureReason ? ` (${w.failureReason})` : ''), time(w.createdAt), time(w.updatedAt)]), { id: 'withdrawals-table' }));
    clear(txBox).append(table(['When', 'Kind', 'Memo', 'Amount'], tx.data.map((t) => [time(t.createdAt), t.kind, t.memo, usd(t.amount)])));
  }

  const amount = h('input', { type: 'number', min: '0.01', step: '0.01', required: true, name: 'amount', id: 'withdraw-amount' });
  const method = h('select', { name: 'method', id: 'withdraw-method' },
    [['', 'Saved method'], ['paypal', 'PayPal'], ['bank_transfer', 'Bank transfer'], ['crypto', 'Crypto']].map(([v, t]) => h('option', { value: v }, t)));
  const detail = h('input', { name: 'detail', id: 'withdraw-detail', placeholder: 'email, IBAN or address', maxlength: 254 });
  const status = h('div', {});
  const form = h('form', { class: 'inline-form', id: 'withdraw-form' },
    field('Amount (USD)', amount), field('Method', method), field('Details', detail, 'Only when not using the saved method'),
    h('button', { type: 'submit', class: 'primary' }, 'Request withdrawal'), status);
  on(form, 'submit', async (event) => {
    event.preventDefault();
    clear(status);
    const d = detail.value.trim();
    const m = { paypal: { type: 'paypal', email: d }, bank_transfer: { type: 'bank_transfer', iban: d }, crypto: { type: 'crypto', address: d } }[method.value];
    try {
      const w = await api('/api/payment/withdraw', {
        method: 'POST', headers: { 'idempotency-key': crypto.randomUUID() },
        body: { providerId: me.id, amount: Number(amount.value), method: m },
      });
      status.append(notice('ok', `Withdrawal ${w.id} requested: ${usd(w.net)} after the ${usd(w.fee)} fee.`));
      await refresh();
    } catch (e) {
      status.append(notice('error', e.message));
    }
  });
  withdrawBox.append(form);
  await refresh();
  const poll = () => {
    if (!ctx.live()) return;
    setTimeout(() => { if (ctx.live()) refresh().then(poll, poll); }, 10_000);
  };
  poll();
}
