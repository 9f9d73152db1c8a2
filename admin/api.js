// The console's only door to the gateway. The key lives in sessionStorage: it is gone
// when the tab closes and is never written to localStorage or a cookie.

const SESSION = 'gs-console-session';

export function session() {
  try {
    const v = JSON.parse(sessionStorage.getItem(SESSION) || 'null');
    return v && typeof v.key === 'string' && (v.role === 'admin' || v.role === 'provider') ? v : null;
  } catch {
    return null;
  }
}

export function signIn(role, key, extra = {}) {
  sessionStorage.setItem(SESSION, JSON.stringify({ role, key, ...extra }));
}

export function signOut() {
  sessionStorage.removeItem(SESSION);
}

export class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

/** Calls the gateway with the session's key; resolves to the parsed JSON body. */
export async function api(path, { method = 'GET', body, key, headers = {} } = {}) {
  const k = key ?? session()?.key;
  const init = { method, headers: { accept: 'application/json', ...headers }, cache: 'no-store' };
  if (k) init.headers.authorization = `Bearer ${k}`;
  if (body !== undefined) {
    init.headers['content-type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, `The gateway cannot be reached (${e.message}).`);
  }
  const text = await response.text();
  let json = null;
  try {
    json = text ? JSON.parse(text) : null;
  } catch {
    json = null;
  }
  if (!response.ok) {
    const message = json?.error?.message || `${response.status} ${response.statusText}`;
    throw new ApiError(response.status, message, json?.error?.code);
  }
  return json;
}

/** `?from=…&to=…` for the analytics endpoints (ms epoch). */
export function range(from, to) {
  return `from=${encodeURIComponent(from)}&to=${encodeURIComponent(to)}`;
}
