// The console shell: sign-in, hash routing, and the navigation for the signed-in role.
// Pages are functions `(root, ctx)` that render into `root`; `ctx.live()` turns false
// when the user navigates away, which ends a page's polling.

import { h, clear, on, notice } from './dom.js';
import { api, session, signIn, signOut, ApiError } from './api.js';
import { ADMIN_PAGES } from './pages.js';
import { providerPage } from './provider.js';

const main = document.getElementById('main');
const nav = document.getElementById('nav');
const who = document.getElementById('who');
const signOutButton = document.getElementById('sign-out');
let generation = 0;

/** Goes to `hash`, rendering once whether or not the hash changes. */
function go(hash) {
  if (location.hash === hash) render();
  else location.hash = hash;
}

on(signOutButton, 'click', () => {
  signOut();
  go('#/');
});
on(window, 'hashchange', () => render());
// A page that polls learns of a revoked or rotated key after it rendered.
on(window, 'gs:unauthorized', () => expired());

function signInPage(message) {
  const key = h('input', { type: 'password', id: 'key', name: 'key', autocomplete: 'off', required: true, placeholder: 'admin key or pk-… provider key', spellcheck: 'false' });
  const status = h('div', { class: 'form-status' }, message ? notice('error', message) : null);
  const form = h('form', { class: 'card signin', id: 'signin' },
    h('h1', {}, 'Sign in'),
    h('p', {}, 'Use the gateway\'s admin key, or your provider key (pk-…) to see your own provider. The key stays in this tab only.'),
    h('label', { class: 'field' }, h('span', { class: 'label' }, 'Key'), key),
    h('button', { type: 'submit', class: 'primary' }, 'Sign in'),
    status);
  on(form, 'submit', async (event) => {
    event.preventDefault();
    const k = key.value.trim();
    clear(status);
    try {
      if (k.startsWith('pk-')) {
        const me = await api('/api/gpu/me', { key: k });
        signIn('provider', k, { providerId: me.id });
        go('#/me');
      } else {
        await api('/api/admin/overview', { key: k });
        signIn('admin', k);
        go('#/overview');
      }
    } catch (e) {
      status.append(notice('error', e.status === 401 ? 'That key was not accepted.' : e.message));
    }
  });
  return form;
}

function render() {
  generation += 1;
  const mine = generation;
  const ctx = { live: () => mine === generation && document.body.contains(root) };
  const root = h('div', { class: 'page' });
  clear(main).append(root);
  clear(nav);
  const s = session();
  signOutButton.hidden = !s;
  who.textContent = s ? (s.role === 'admin' ? 'Admin' : `Provider ${s.providerId || ''}`) : '';
  if (!s) {
    root.append(signInPage());
    return;
  }
  const path = location.hash.replace(/^#\/?/, '').split('?')[0];
  if (s.role === 'provider') {
    nav.append(h('a', { href: '#/me', class: 'active' }, 'My provider'));
    run(providerPage, root, ctx);
    return;
  }
  const page = ADMIN_PAGES.find((p) => p.path === path) || ADMIN_PAGES[0];
  for (const p of ADMIN_PAGES) {
    nav.append(h('a', { href: `#/${p.path}`, class: p === page ? 'active' : null, 'aria-current': p === page ? 'page' : null }, p.title));
  }
  document.title = `${page.title} · GPU Streaming console`;
  run(page.render, root, ctx);
}

/** Runs a page; a rejected key sends the user back to the sign-in form. */
async function run(page, root, ctx) {
  try {
    await page(root, ctx);
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      expired();
      return;
    }
    if (ctx.live()) root.append(notice('error', e.message));
  }
}

function expired() {
  signOut();
  render();
  clear(main).append(h('div', { class: 'page' }, signInPage('The key was rejected; sign in again.')));
}

render();
