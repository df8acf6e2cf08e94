// The page of the reference web client (docs/web-client.md): plain JavaScript, no build step.
//
// Subscribe: ask permission, fetch the VAPID public key from the subscribe function
// (GET /vapid-public-key), subscribe with PushManager, and register the subscription with the
// user's bearer token. The service worker (sw.js) then shows the wiki's notifications.
'use strict';

const FIELDS = {
  subscribe: 'subscribe-url',
  unsubscribe: 'unsubscribe-url',
  app: 'app',
  wiki: 'wiki-api',
  token: 'token',
  standin: 'standin',
};
// Where the subscription this page registered is kept, for unsubscribing it later: a stand-in
// one cannot be asked back from PushManager.
const STORED_SUBSCRIPTION = 'push-functions.subscription';
// How long to wait for the browser's push service before giving up on it. A browser that
// cannot reach it (no network to it, or a headless one) never answers at all.
const DEFAULT_PUSH_TIMEOUT_SECONDS = 10;

const params = new URLSearchParams(location.search);

function field(name) {
  return document.getElementById(FIELDS[name]).value.trim();
}

function report(action, outcome, text) {
  const status = document.getElementById('status');
  status.textContent = text;
  status.dataset.action = action;
  status.dataset.outcome = outcome;
}

// A JSON request to one of the functions, with the user's token; a refusal becomes an Error
// carrying the function's JSON error (the CORS headers let the page read it) and Retry-After.
async function call(url, method, body) {
  const headers = { Authorization: `Bearer ${field('token')}` };
  if (body !== undefined) headers['Content-Type'] = 'application/json';
  const response = await fetch(url, {
    method, headers, body: body === undefined ? undefined : JSON.stringify(body),
  });
  const answer = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = answer.error || {};
    const retry = response.headers.get('Retry-After');
    const message = `${response.status} ${error.code || ''}: ${error.message || response.statusText}`;
    throw new Error(retry ? `${message} (try again in ${retry} s)` : message);
  }
  return answer;
}

function functionUrl(name, path = '') {
  const base = field(name);
  if (!base) throw new Error(`fill in the ${name} function's address`);
  return base.replace(/\/+$/, '') + path;
}

async function vapidPublicKey() {
  const app = field('app');
  const url = functionUrl('subscribe', '/vapid-public-key') + (app ? `?app=${encodeURIComponent(app)}` : '');
  const response = await fetch(url);
  const answer = await response.json();
  if (!response.ok) throw new Error(`no VAPID key: ${answer.error.message}`);
  return answer.public_key;
}

async function serviceWorker() {
  // The wiki's API travels in the worker's address: the worker has no page to ask.
  const wiki = field('wiki');
  await navigator.serviceWorker.register(`sw.js?wiki=${encodeURIComponent(wiki)}`);
  return navigator.serviceWorker.ready;
}

// A subscription from the browser's push service, or, when that cannot be reached and a
// stand-in push service is named, one the page makes itself: a real P-256 key pair and auth
// secret, as a browser makes them, with an endpoint on the stand-in.
async function pushSubscription(registration, key) {
  const existing = await registration.pushManager.getSubscription();
  if (existing) {
    const current = existing.options.applicationServerKey;
    if (current && base64url(current) === key) return { subscription: existing.toJSON(), real: existing };
    await existing.unsubscribe(); // the key was rotated: subscribe again with the new one
  }
  const timeout = Number(params.get('timeout') || DEFAULT_PUSH_TIMEOUT_SECONDS) * 1000;
  try {
    const real = await Promise.race([
      registration.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: key }),
      new Promise((_, reject) => setTimeout(() => reject(new Error('no answer from the push service')), timeout)),
    ]);
    return { subscription: real.toJSON(), real };
  } catch (error) {
    const standin = field('standin');
    if (!standin) throw new Error(`this browser cannot subscribe: ${error.message}`);
    return { subscription: await standInSubscription(standin), real: null };
  }
}

async function standInSubscription(origin) {
  const pair = await crypto.subtle.generateKey({ name: 'ECDH', namedCurve: 'P-256' }, true, ['deriveBits']);
  const point = await crypto.subtle.exportKey('raw', pair.publicKey);
  const id = base64url(crypto.getRandomValues(new Uint8Array(12)));
  return {
    endpoint: `${origin.replace(/\/+$/, '')}/push/${id}`,
    expirationTime: null,
    keys: { p256dh: base64url(point), auth: base64url(crypto.getRandomValues(new Uint8Array(16))) },
  };
}

async function subscribe() {
  if (!('serviceWorker' in navigator) || !('PushManager' in window)) {
    throw new Error('this browser has no Push API (or the page is not in a secure context)');
  }
  if (await Notification.requestPermission() !== 'granted') {
    throw new Error('notifications are not allowed for this page');
  }
  const key = await vapidPublicKey();
  const registration = await serviceWorker();
  const { subscription, real } = await pushSubscription(registration, key);
  const body = { provider: 'webpush', subscription };
  if (field('app')) body.app = field('app');
  const saved = await call(functionUrl('subscribe'), 'POST', body);
  localStorage.setItem(STORED_SUBSCRIPTION, JSON.stringify(subscription));
  const how = real ? 'the browser\'s push service' : `the stand-in push service ${field('standin')}`;
  return `Subscribed (id ${saved.id}) through ${how}, with VAPID key ${key}.`;
}

async function list() {
  const { subscriptions } = await call(functionUrl('subscribe'), 'GET');
  const mine = await ownHash();
  const rows = document.getElementById('subscriptions');
  rows.replaceChildren(...subscriptions.map((s) => {
    const row = document.createElement('tr');
    row.dataset.id = s.id;
    const cells = [s.id, s.provider, s.app || '', s.updated, s.token_sha256 === mine ? 'this browser' : ''];
    for (const text of cells) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
  return `${subscriptions.length} device(s) subscribed.`;
}

async function unsubscribe() {
  const stored = JSON.parse(localStorage.getItem(STORED_SUBSCRIPTION) || 'null');
  if (!stored) throw new Error('this browser has no subscription of this page');
  const { deleted } = await call(functionUrl('unsubscribe'), 'POST', { provider: 'webpush', endpoint: stored.endpoint });
  await forgetOwn();
  return `Unsubscribed (${deleted} removed).`;
}

async function unsubscribeAll() {
  const { deleted } = await call(functionUrl('unsubscribe'), 'POST', { all: true });
  await forgetOwn();
  return `Unsubscribed every device (${deleted} removed).`;
}

async function forgetOwn() {
  localStorage.removeItem(STORED_SUBSCRIPTION);
  const registration = await navigator.serviceWorker.getRegistration();
  const real = registration && await registration.pushManager.getSubscription();
  if (real) await real.unsubscribe();
}

// The service lists a Web Push subscription by the SHA-256 of its endpoint, never the endpoint.
async function ownHash() {
  const stored = JSON.parse(localStorage.getItem(STORED_SUBSCRIPTION) || 'null');
  if (!stored) return null;
  const digest = await crypto.subtle.digest('SHA-256', new TextEncoder().encode(stored.endpoint));
  return [...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('');
}

function base64url(buffer) {
  const bytes = new Uint8Array(buffer instanceof ArrayBuffer ? buffer : buffer.buffer);
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
}

const ACTIONS = { subscribe, list, unsubscribe, 'unsubscribe-all': unsubscribeAll };

// The fields fill from the address or from the last visit; never the token, which stays in the
// page (an address is kept in history and logs).
for (const [name, id] of Object.entries(FIELDS)) {
  if (name === 'token') continue;
  const input = document.getElementById(id);
  input.value = params.get(name) || localStorage.getItem(`push-functions.${name}`) || '';
  input.addEventListener('change', () => localStorage.setItem(`push-functions.${name}`, input.value));
}
for (const [id, action] of Object.entries(ACTIONS)) {
  document.getElementById(id).addEventListener('click', async () => {
    report(id, 'busy', '...');
    try {
      report(id, 'ok', await action());
    } catch (error) {
      report(id, 'error', error.message);
    }
  });
}
// The service worker says what it showed on a push (see sw.js).
navigator.serviceWorker?.addEventListener('message', (event) => {
  const shown = event.data?.shown;
  if (!shown) return;
  document.getElementById('last-notification').textContent = JSON.stringify(shown, null, 2);
  report('push', 'ok', `Shown: ${shown.map((n) => n.title).join(', ')}`);
});
