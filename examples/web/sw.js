// The service worker of the reference web client (docs/web-client.md).
//
// A push from push-functions carries no content, only its type ({"type": "checkEchoV1"}): the
// worker wakes, fetches the user's unread notifications from the wiki's API itself
// (action=query&meta=notifications, as the RFC's flow says), and shows one notification for
// them. Nothing the user reads passes through the push service.
'use strict';

const WIKI_API = new URL(self.location.href).searchParams.get('wiki');
const TAG = 'wiki-notifications'; // one notification at a time: a newer push replaces it
const HANDLERS = { checkEchoV1: showWikiNotifications };

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

self.addEventListener('push', (event) => {
  let type = null;
  try {
    type = event.data ? event.data.json().type : null;
  } catch (error) {
    // not JSON: not ours to read, but a push must still show something (userVisibleOnly)
  }
  const handler = HANDLERS[type] || (() => show('New activity on the wiki', {}));
  event.waitUntil(handler().catch(() => show('You have new notifications on the wiki', {})));
});

self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const url = event.notification.data && event.notification.data.url;
  if (url) event.waitUntil(self.clients.openWindow(url));
});

async function showWikiNotifications() {
  if (!WIKI_API) return show('You have new notifications on the wiki', {});
  const url = new URL(WIKI_API);
  url.search = new URLSearchParams({
    action: 'query',
    meta: 'notifications',
    notprop: 'list|count',
    notfilter: '!read',
    notformat: 'model',
    notlimit: '1',
    format: 'json',
    formatversion: '2',
  }).toString();
  if (url.origin !== self.location.origin) {
    // MediaWiki answers a cross-origin request with CORS headers only when told the origin.
    url.searchParams.set('origin', self.location.origin);
  }
  // The wiki knows the user by their session cookie, as when they read the page.
  const response = await fetch(url, { credentials: 'include' });
  if (!response.ok) throw new Error(`the wiki answered ${response.status}`);
  const answer = await response.json();
  const notifications = answer.query && answer.query.notifications;
  const newest = notifications && notifications.list && notifications.list[0];
  if (!newest) return show('You have new notifications on the wiki', {});
  const model = newest['*'] || {};
  const count = Number(notifications.rawcount || notifications.count || 1);
  const title = text(model.header) || 'New notification on the wiki';
  const more = count > 1 ? `+${count - 1} more unread` : '';
  const body = [text(model.body || model.compactHeader), more].filter(Boolean).join('\n');
  const link = model.links && model.links.primary && model.links.primary.url;
  return show(title, { body, data: { url: link || null, id: newest.id }, icon: model.iconUrl });
}

// Shows the notification, then tells the open pages what the browser now holds for it.
async function show(title, options) {
  await self.registration.showNotification(title, { tag: TAG, renotify: true, ...options });
  const held = (await self.registration.getNotifications({ tag: TAG }))
    .map((n) => ({ title: n.title, body: n.body, tag: n.tag, data: n.data }));
  for (const client of await self.clients.matchAll({ type: 'window', includeUncontrolled: true })) {
    client.postMessage({ shown: held });
  }
}

// Echo's headers carry markup (<strong>...</strong>) and entities; a notification shows text.
function text(html) {
  if (!html) return '';
  const entities = { amp: '&', lt: '<', gt: '>', quot: '"', '#039': "'", nbsp: ' ' };
  return html.replace(/<[^>]*>/g, '').replace(/&(amp|lt|gt|quot|#039|nbsp);/g, (_, name) => entities[name]).trim();
}
