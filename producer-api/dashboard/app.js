// PayOS Workflows dashboard: sign-in, hash routing, and every view of /dashboard (templates, the
// visual builder, instances, the pending-approvals inbox, analytics). Talks to the same-origin
// JSON API with the bearer key kept in sessionStorage. Renders API data only through
// textContent/attributes (never innerHTML), and runs under a strict CSP (no eval, no inline code).
'use strict';

/* ---------- DOM helpers ---------- */

const $ = (sel, root = document) => root.querySelector(sel);
const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));

// Build an element. Strings among the children become text nodes, so API data is never parsed
// as HTML. `value`/`checked` are set as properties, after the children (a select's options).
function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  const props = {};
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'value' || k === 'checked') props[k] = v;
    else if (k === 'class') el.className = v;
    else if (k.startsWith('on') && typeof v === 'function') el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c !== null && c !== undefined && c !== false) el.append(c instanceof Node ? c : String(c));
  }
  Object.assign(el, props);
  return el;
}

const clear = (el) => { el.replaceChildren(); return el; };
const pretty = (v) => JSON.stringify(v, null, 2);
const shortId = (id) => (id && id.length > 13 ? `${id.slice(0, 8)}…${id.slice(-4)}` : id || '');
const num = (n) => (n === null || n === undefined ? '—' : Number(n).toLocaleString());
const pct = (r) => (r === null || r === undefined ? '—' : `${Math.round(r * 100)}%`);

function fmtTime(iso) {
  if (!iso) return '—';
  const d = new Date(iso);
  if (Number.isNaN(d.getTime())) return iso;
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
}

function fmtDuration(ms) {
  if (ms === null || ms === undefined || Number.isNaN(ms)) return '—';
  const s = Math.abs(ms) / 1000;
  if (s < 1) return `${Math.round(Math.abs(ms))}ms`;
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)}s`;
  const m = Math.floor(s / 60), hr = Math.floor(m / 60), d = Math.floor(hr / 24);
  if (d > 0) return `${d}d ${hr % 24}h`;
  if (hr > 0) return `${hr}h ${m % 60}m`;
  return `${m}m ${Math.floor(s % 60)}s`;
}

// "5m ago" / "in 2d 3h": how long something has waited, or until a deadline.
function relative(iso) {
  if (!iso) return '';
  const delta = new Date(iso).getTime() - Date.now();
  if (Number.isNaN(delta)) return '';
  return delta < 0 ? `${fmtDuration(-delta)} ago` : `in ${fmtDuration(delta)}`;
}

const timeCell = (iso) => h('time', { datetime: iso, title: iso }, fmtTime(iso));
const badge = (text, kind) => h('span', { class: `badge ${kind || text}` }, text);
const jsonDetails = (label, value) =>
  h('details', { class: 'json' }, h('summary', {}, label), h('pre', { class: 'code' }, pretty(value)));

/* ---------- API ---------- */

const KEY = 'payos.workflows.apiKey';
const ME = 'payos.workflows.me';
const apiKey = () => sessionStorage.getItem(KEY);

// Who the key acts as (GET /v1/workflows/me), kept beside the key for the top bar.
function whoAmI() {
  try {
    return JSON.parse(sessionStorage.getItem(ME) || 'null');
  } catch {
    return null;
  }
}

class ApiError extends Error {
  constructor(status, body, fallback) {
    const e = (body && body.error) || {};
    super(e.message || fallback || `HTTP ${status}`);
    this.status = status;
    this.code = e.code || (status ? `http_${status}` : 'network_error');
    this.details = Array.isArray(e.details) ? e.details : [];
    this.requestId = (body && body.request_id) || '';
  }
}

// Query string of the non-empty params: the API refuses unknown or malformed ones, so an
// empty filter is left out rather than sent blank.
function qs(params) {
  const q = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v !== null && v !== undefined && v !== '') q.set(k, v);
  const s = q.toString();
  return s ? `?${s}` : '';
}

async function request(method, path, body) {
  const headers = { Authorization: `Bearer ${apiKey() || ''}`, Accept: 'application/json' };
  const init = { method, headers };
  if (body !== undefined) {
    headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, init);
  } catch (e) {
    throw new ApiError(0, null, `the server could not be reached (${e.message})`);
  }
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { /* not JSON: reported below */ }
  if (!res.ok) {
    const err = new ApiError(res.status, data, text.slice(0, 200));
    if (res.status === 401) signOut(`The API key was refused (${err.code}: ${err.message}). Sign in again.`);
    throw err;
  }
  return { status: res.status, data, text, headers: res.headers };
}

const api = async (method, path, body) => (await request(method, path, body)).data;

/* ---------- error banner ---------- */

function showError(err) {
  if (err && err.status === 401) return; // the sign-in view explains it
  const banner = clear($('#error-banner'));
  const e = err instanceof ApiError ? err : { code: 'client_error', message: String(err && err.message || err), details: [] };
  if (!(err instanceof ApiError)) console.warn(err);
  banner.append(
    h('div', { class: 'banner-text' },
      h('strong', {}, e.code), ': ', e.message,
      e.requestId ? h('span', { class: 'rid' }, ` (request id ${e.requestId})`) : null,
      e.details.length ? h('ul', {}, e.details.map((d) => h('li', {}, h('code', {}, d.path), ` ${d.problem}`))) : null),
    h('button', { type: 'button', class: 'link', 'aria-label': 'Dismiss', onclick: hideError }, '×'));
  banner.hidden = false;
}

function hideError() {
  clear($('#error-banner')).hidden = true;
}

// Run an async view action; any failure lands in the banner.
const guard = (fn) => (...args) => Promise.resolve().then(() => fn(...args)).catch(showError);

/* ---------- state, sign-in and routing ---------- */

const state = {
  seq: 0,                 // bumped per route: a stale async render checks it and stops
  next: '',               // where to go after signing in
  templates: null,        // Map id -> template summary (the list), loaded on demand
  builder: null,          // the template being edited: see openBuilder()
  instances: { filter: {}, cursors: [null], page: 0 },
  pendingCursor: null,
  detail: null,           // the instance shown in #instance-detail
  definitions: new Map(), // `${templateId}@${version}` -> template document
};

function signOut(message) {
  sessionStorage.removeItem(KEY);
  sessionStorage.removeItem(ME);
  state.templates = null;
  state.builder = null;
  $('#sign-in-message').textContent = message || '';
  if (location.hash !== '#/sign-in') {
    if (message && location.hash) state.next = location.hash;
    location.hash = '#/sign-in';
  } else {
    route();
  }
}

async function signIn(event) {
  event.preventDefault();
  const key = $('#api-key').value.trim();
  const msg = $('#sign-in-message');
  if (!key) { msg.textContent = 'Paste an API key first.'; return; }
  sessionStorage.setItem(KEY, key);
  msg.textContent = 'Checking the key…';
  try {
    sessionStorage.setItem(ME, JSON.stringify(await api('GET', '/v1/workflows/me')));
  } catch (err) {
    if (err.status !== 401) {
      sessionStorage.removeItem(KEY);
      msg.textContent = `Could not check the key: ${err.code}: ${err.message}`;
    }
    return;
  }
  $('#api-key').value = '';
  msg.textContent = '';
  const next = state.next && state.next !== '#/sign-in' ? state.next : '#/templates';
  state.next = '';
  if (location.hash === next) route(); else location.hash = next;
}

const ROUTES = [
  [/^#\/templates$/, 'view-templates', 'templates', () => showTemplates()],
  [/^#\/builder$/, 'view-builder', 'templates', () => openBuilder(null)],
  [/^#\/builder\/(.+)$/, 'view-builder', 'templates', (id) => openBuilder(id)],
  [/^#\/instances$/, 'view-instances', 'instances', (_, q) => showInstances(q)],
  [/^#\/instances\/(.+)$/, 'instance-detail', 'instances', (id) => showInstance(id)],
  [/^#\/pending$/, 'view-pending', 'pending', () => showPending()],
  [/^#\/analytics$/, 'view-analytics', 'analytics', () => showAnalytics()],
];

function showView(id, nav) {
  for (const v of $$('main > .view')) v.hidden = v.id !== id;
  for (const a of $$('#nav a')) {
    if (a.dataset.nav === nav) a.setAttribute('aria-current', 'page');
    else a.removeAttribute('aria-current');
  }
}

function route() {
  state.seq += 1;
  hideError();
  const [path, query] = location.hash.split('?');
  const signedIn = Boolean(apiKey());
  $('#nav').hidden = !signedIn;
  $('#session').hidden = !signedIn;
  if (!signedIn) {
    if (path && path !== '#/sign-in') state.next = location.hash;
    showView('view-signin');
    $('#api-key').focus();
    return;
  }
  const me = whoAmI();
  $('#key-hint').textContent = me
    ? `${me.actor.id} (${me.actor.type}${me.roles.length ? `: ${me.roles.join(', ')}` : ''}) · ${me.partner_id}`
    : `key ${apiKey().slice(0, 8)}…`;
  for (const [re, view, nav, fn] of ROUTES) {
    const m = re.exec(path);
    if (m) {
      showView(view, nav);
      guard(fn)(m[1] && decodeURIComponent(m[1]), new URLSearchParams(query || ''));
      return;
    }
  }
  location.replace('#/templates');
}

/* ---------- templates ---------- */

async function loadTemplates(force) {
  if (state.templates && !force) return state.templates;
  const all = [];
  let cursor = null;
  do {
    const page = await api('GET', `/v1/workflows/templates${qs({ limit: 100, cursor })}`);
    all.push(...page.data);
    cursor = page.next_cursor;
  } while (cursor && all.length < 2000);
  state.templates = new Map(all.map((t) => [t.id, t]));
  return state.templates;
}

const templateName = (id) => (state.templates && state.templates.get(id) || {}).name || shortId(id);

// Fill a <select> with the templates, keeping `selected`; `anyLabel` adds a "no filter" option.
function fillTemplateSelect(select, selected, anyLabel) {
  const opts = [...(state.templates || new Map()).values()]
    .map((t) => h('option', { value: t.id }, t.active ? t.name : `${t.name} (inactive)`));
  clear(select).append(...(anyLabel ? [h('option', { value: '' }, anyLabel)] : []), ...opts);
  select.value = selected || '';
  if (select.selectedIndex < 0 && select.options.length) select.selectedIndex = 0;
}

async function showTemplates() {
  const seq = state.seq;
  const templates = await loadTemplates(true);
  if (seq !== state.seq) return;
  renderTemplates(templates);
}

function renderTemplates(templates) {
  const filter = $('#templates-filter').value;
  const rows = [...templates.values()].filter((t) =>
    filter === 'all' || (filter === 'active') === t.active);
  const body = clear($('#templates tbody'));
  for (const t of rows) {
    body.append(h('tr', { 'data-template-id': t.id, class: t.active ? '' : 'inactive' },
      h('td', { class: 'name' }, h('a', { href: `#/builder/${encodeURIComponent(t.id)}` }, t.name)),
      h('td', { class: 'trigger' }, t.trigger_type),
      h('td', { class: 'version num' }, `v${t.version}`),
      h('td', { class: 'active' }, t.active ? badge('active') : badge('inactive')),
      h('td', { class: 'steps num' }, t.step_count),
      h('td', {}, timeCell(t.created_at), h('span', { class: 'muted' }, ` by ${t.created_by}`)),
      h('td', { class: 'row-actions' },
        h('a', { class: 'button', href: `#/builder/${encodeURIComponent(t.id)}` }, 'Open'),
        h('a', { class: 'button', href: `#/instances?template_id=${encodeURIComponent(t.id)}` }, 'Instances'),
        t.active ? h('button', { type: 'button', class: 'danger deactivate', onclick: guard(() => deactivate(t.id)) }, 'Deactivate') : null)));
  }
  $('#templates-empty').hidden = rows.length > 0;
}

// Deactivate: no new instances start; running ones finish on their version.
async function deactivate(id) {
  const view = await api('DELETE', `/v1/workflows/templates/${encodeURIComponent(id)}`);
  if (state.templates) state.templates.set(id, view);
  if (state.builder && state.builder.id === id) {
    state.builder.active = false;
    renderBuilderHead();
    setStatus(`Deactivated “${view.name}”: no new instances will start.`, 'ok');
  } else {
    renderTemplates(state.templates);
  }
}

/* ---------- builder: the document is the model ---------- */
// The builder edits the template document in place: each control reads and writes one path of
// it, so keys the form does not show (and the order of the rest) survive a load/save round trip.

const STEP_TYPES = ['approval', 'condition', 'action', 'wait', 'notification'];
const ACTIONS = ['execute_transfer', 'cancel_transfer', 'simulate_transfer', 'http'];
const TRIGGER_OPS = ['eq', 'ne', 'gt', 'gte', 'lt', 'lte', 'in', 'not_in', 'contains', 'exists'];
const DAYS = ['mon', 'tue', 'wed', 'thu', 'fri', 'sat', 'sun'];
// Config keys that hold a route (`skip_to:N` is renumbered when steps move).
const ROUTE_KEYS = {
  condition: { if_true: 'if true', if_false: 'if false' },
  action: { on_failure: 'on failure' },
  wait: { on_timeout: 'on timeout' },
  notification: { on_failure: 'on failure' },
};
// Config keys each step form renders; others are kept and listed as "only in JSON".
const KNOWN_KEYS = {
  approval: ['approvers', 'min_approvals', 'timeout_hours', 'timeout', 'reject_policy',
    'require_comment_on_reject', 'on_timeout', 'notify', 'remind_before'],
  condition: ['expression', 'if_true', 'if_false'],
  action: ['action', 'params', 'max_attempts', 'on_failure'],
  wait: ['duration', 'until', 'window', 'signal', 'timeout', 'on_timeout'],
  notification: ['channel', 'url', 'event', 'payload', 'to', 'subject', 'body', 'wait_for_delivery', 'on_failure'],
};
const WAIT_MODES = ['duration', 'until', 'window', 'signal'];

function defaultConfig(type) {
  switch (type) {
    case 'approval': return { approvers: { type: 'role', value: '' }, timeout_hours: 24 };
    case 'condition': return { expression: 'trigger.amount <= 1000', if_true: 'continue', if_false: 'continue' };
    case 'action': return { action: 'execute_transfer', params: { transfer_id: '{{trigger.id}}' } };
    case 'wait': return { duration: '1h' };
    default: return { channel: 'email', to: '', subject: '' };
  }
}

// "config.approvers[1].type" -> ['config', 'approvers', 1, 'type']
const splitPath = (p) => p.split(/\.|(?=\[)/).map((s) => (s.startsWith('[') ? Number(s.slice(1, -1)) : s));

function getPath(obj, path) {
  return splitPath(path).reduce((o, k) => (o !== null && typeof o === 'object' ? o[k] : undefined), obj);
}

// Write `value` at `path`, creating objects on the way; `undefined` deletes the key.
function setPath(obj, path, value) {
  const keys = splitPath(path);
  const last = keys.pop();
  let o = obj;
  for (const k of keys) {
    if (o[k] === null || typeof o[k] !== 'object') {
      if (value === undefined) return;
      o[k] = {};
    }
    o = o[k];
  }
  if (value === undefined) delete o[last]; else o[last] = value;
}

const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);
// A step's config object, made one if the document lacks it (only ever on a user's edit).
const cfgOf = (step) => (isObj(step.config) ? step.config : (step.config = {}));
const stepsOf = (doc) => (Array.isArray(doc.steps) ? doc.steps : []);

async function openBuilder(id) {
  const prev = state.builder;
  // Just saved a new template: the hash moved to its id, the form already shows it.
  if (id && prev && prev.id === id && prev.keepOnLoad) { prev.keepOnLoad = false; return; }
  const b = state.builder = {
    id: null, doc: { name: '', trigger_type: 'manual', steps: [] }, saved: null, version: null,
    active: true, versions: [], errors: [], drafts: new Map(), editing: false,
  };
  setJsonEditing(false);
  // A blank form first: never the previous template's, even if this one fails to load.
  renderBuilder();
  renderBuilderHead();
  setStatus(id ? 'Loading…' : '');
  if (!state.templates) loadTemplates().catch(showError);
  if (!id) return;
  const seq = state.seq;
  let view;
  try {
    view = await api('GET', `/v1/workflows/templates/${encodeURIComponent(id)}`);
  } finally {
    if (seq === state.seq) setStatus('');
  }
  if (seq !== state.seq || state.builder !== b) return;
  takeSaved(view);
  renderBuilder();
  renderBuilderHead();
}

// Adopt the server's copy of the template as the form's document.
function takeSaved(view) {
  const b = state.builder;
  Object.assign(b, { id: view.id, version: view.version, active: view.active, versions: view.versions || [] });
  b.doc = structuredClone(view.definition);
  b.saved = JSON.stringify(view.definition);
  if (state.templates) state.templates.set(view.id, view);
}

function renderBuilderHead() {
  const b = state.builder;
  $('#builder-title').textContent = b.id
    ? `${(state.templates && state.templates.get(b.id) || {}).name || b.doc.name || 'Template'} · v${b.version}${b.active ? '' : ' (inactive)'}`
    : 'New template';
  $('#tpl-deactivate').hidden = !b.id || !b.active;
  const sel = $('#tpl-versions');
  const many = b.versions.length > 1;
  sel.hidden = !many;
  $('#tpl-versions-label').hidden = !many;
  clear(sel).append(h('option', { value: '' }, `v${b.version} (latest)`),
    ...b.versions.slice(0, -1).reverse().map((v) =>
      h('option', { value: String(v.version) }, `v${v.version} · ${fmtTime(v.created_at)} · ${v.created_by}`)));
}

function setStatus(text, kind) {
  const el = $('#builder-status');
  el.className = `status ${kind || ''}`;
  el.textContent = text;
}

/* ----- builder rendering ----- */

let fieldSeq = 0;
const fid = () => `f${++fieldSeq}`;

// A labelled form row; the label points at the control.
function row(label, control, hint) {
  if (!control.id) control.id = fid();
  return h('div', { class: 'field' }, h('label', { for: control.id }, label), control,
    hint ? h('small', { class: 'hint' }, hint) : null);
}

function checkRow(label, control) {
  control.id = control.id || fid();
  return h('div', { class: 'field check' }, control, h('label', { for: control.id }, label));
}

const str = (v) => (v === undefined || v === null ? '' : typeof v === 'string' ? v : JSON.stringify(v));
const textIn = (field, value, extra) => h('input', { type: 'text', 'data-field': field, value: str(value), autocomplete: 'off', ...extra });
const numIn = (field, value, extra) => textIn(field, value, { inputmode: 'decimal', 'data-kind': 'num', class: 'short', ...extra });
const areaIn = (field, value, extra) => h('textarea', { 'data-field': field, rows: 2, value: str(value), ...extra });
const jsonIn = (field, value) => h('textarea', {
  'data-field': field, 'data-kind': 'json', class: 'code', rows: 3, spellcheck: 'false',
  value: value === undefined ? '' : pretty(value),
});
const boolIn = (field, checked) => h('input', { type: 'checkbox', 'data-field': field, 'data-kind': 'bool', checked: Boolean(checked) });

// A select over [value, label] pairs; a current value it does not list is kept as an option, so
// showing a document never changes it.
function selectIn(field, value, options, extra) {
  const opts = options.slice();
  if (value !== undefined && value !== null && !opts.some(([v]) => v === String(value))) {
    opts.push([String(value), `${str(value)} (as in the document)`]);
  }
  const el = h('select', { 'data-field': field, ...extra }, opts.map(([v, l]) => h('option', { value: v }, l)));
  if (value !== undefined && value !== null) el.value = String(value);
  return el;
}

function stepLabel(steps, t) {
  const s = steps[t];
  if (t >= steps.length) return `step ${t} (not added yet)`;
  return `step ${t}${isObj(s) && s.name ? ` · ${s.name}` : ''}`;
}

// Steps past the end a route may already name, so a flow can be built top-down (set the jump,
// then add the step it lands on).
const AHEAD = 3;

// The route choices of step `i`: `skip_to` only forwards, as the validator requires.
function routeOptions(steps, i, allowEnd, dflt) {
  const opts = [['continue', 'continue to the next step'], ['fail', 'fail the instance']];
  if (allowEnd) opts.splice(1, 0, ['end', 'end: complete the instance now']);
  for (let t = i + 1; t < Math.max(steps.length, i + 1) + AHEAD; t++) {
    opts.push([`skip_to:${t}`, `skip to ${stepLabel(steps, t)}`]);
  }
  return opts.map(([v, l]) => [v, v === dflt ? `${l} (default)` : l]);
}

function renderBuilder() {
  const b = state.builder;
  const doc = b.doc;
  const focus = focusKey();
  $('#tpl-name').value = str(doc.name);
  $('#tpl-description').value = str(doc.description);
  const trigger = $('#tpl-trigger-type');
  for (const o of $$('option.extra', trigger)) o.remove();
  if (doc.trigger_type && !['manual', 'on_transfer'].includes(doc.trigger_type)) {
    trigger.append(h('option', { class: 'extra', value: str(doc.trigger_type) }, `${str(doc.trigger_type)} (as in the document)`));
  }
  trigger.value = str(doc.trigger_type);
  $('#tpl-sod').checked = !(isObj(doc.settings) && doc.settings.separation_of_duties === false);
  renderConditions(doc);
  renderFlow(doc);
  for (const el of $$('[data-kind="json"]', $('#builder-form'))) showDraft(el);
  applyErrors();
  updatePreview();
  restoreFocus(focus);
}

function renderConditions(doc) {
  const box = clear($('#tpl-conditions'));
  const conds = isObj(doc.trigger_config) && Array.isArray(doc.trigger_config.conditions) ? doc.trigger_config.conditions : [];
  if (doc.trigger_type !== 'on_transfer' && !conds.length) return;
  box.append(h('div', { class: 'sub-head' }, h('span', {}, 'Start when a transfer matches all of'),
    h('button', { type: 'button', 'data-action': 'add-condition' }, '+ condition')));
  const list = h('div', { class: 'conditions', 'data-anchor': 'trigger_config.conditions' });
  conds.forEach((c, i) => {
    const base = `trigger_config.conditions[${i}]`;
    const op = isObj(c) ? c.op : undefined;
    const value = isObj(c) ? c.value : undefined;
    const valueIn = op === 'exists'
      ? selectIn(`${base}.value`, value === undefined ? '' : String(value),
        [['', 'exists (default)'], ['true', 'exists'], ['false', 'is absent']], { 'data-kind': 'bool-text' })
      : textIn(`${base}.value`, showLoose(value), { 'data-kind': 'loose', placeholder: op === 'in' || op === 'not_in' ? '["EUR", "USD"]' : 'value' });
    list.append(h('div', { class: 'cond-row', 'data-anchor': base },
      row('Field', textIn(`${base}.field`, isObj(c) ? c.field : '', { placeholder: 'metadata.type' })),
      row('Op', selectIn(`${base}.op`, op, TRIGGER_OPS.map((o) => [o, o]), { 'data-kind': 'op', 'data-rerender': '' })),
      row('Value', valueIn),
      h('button', {
        type: 'button', class: 'icon', 'data-action': 'remove-condition', 'data-index': i, 'aria-label': `Remove condition ${i}`,
      }, '×')));
  });
  if (!conds.length) list.append(h('p', { class: 'muted' }, 'No conditions: every transfer starts this workflow.'));
  box.append(list);
}

// A condition value is typed as JSON when it parses (500, true, ["a"]) and as text otherwise.
function showLoose(v) {
  if (v === undefined) return '';
  if (typeof v !== 'string') return JSON.stringify(v);
  try { JSON.parse(v); return JSON.stringify(v); } catch { return v; }
}

function parseLoose(text) {
  if (text.trim() === '') return undefined;
  try { return JSON.parse(text); } catch { return text; }
}

function renderFlow(doc) {
  const flow = clear($('#flow'));
  if (doc.steps !== undefined && !Array.isArray(doc.steps)) {
    flow.append(h('p', { class: 'message bad' }, '“steps” is not an array in this document: fix it with Edit JSON.'));
    return;
  }
  const steps = stepsOf(doc);
  const incoming = steps.map(() => []);
  steps.forEach((s, i) => {
    for (const [key, label] of Object.entries(ROUTE_KEYS[s && s.type] || {})) {
      const t = skipTarget(s.config && s.config[key]);
      if (t !== null && incoming[t]) incoming[t].push(`from step ${i} ${label}`);
    }
  });
  flow.append(h('div', { class: 'flow-start' }, doc.trigger_type === 'on_transfer' ? 'Transfer matches' : 'Started'));
  steps.forEach((s, i) => {
    flow.append(h('div', { class: 'connector', 'aria-hidden': 'true' }), stepCard(steps, i, incoming[i]));
  });
  if (!steps.length) {
    flow.append(h('div', { class: 'connector', 'aria-hidden': 'true' }), h('p', { class: 'empty' }, 'No steps yet: add the first one below.'));
  }
  flow.append(h('div', { class: 'connector', 'aria-hidden': 'true' }), h('div', { class: 'flow-end' }, 'Completed'));
}

const skipTarget = (route) => {
  const m = typeof route === 'string' && /^skip_to:(\d+)$/.exec(route);
  return m ? Number(m[1]) : null;
};

function stepCard(steps, i, incoming) {
  const step = steps[i];
  const type = isObj(step) && STEP_TYPES.includes(step.type) ? step.type : null;
  const last = i === steps.length - 1;
  const card = h('div', { class: `step-card type-${type || 'unknown'}`, 'data-step-index': i, 'data-anchor': '' },
    h('div', { class: 'step-head' },
      h('span', { class: 'step-index', title: 'step index (skip_to and the API count from 0)' }, i),
      h('span', { class: 'step-type' }, type || str(isObj(step) ? step.type : step) || 'unknown'),
      textIn('name', isObj(step) ? step.name : '',
        { class: 'step-name', 'aria-label': `Step ${i} name`, 'data-labels': '', placeholder: 'Step name' }),
      h('span', { class: 'step-tools' },
        h('button', { type: 'button', class: 'icon move-up', disabled: i === 0, 'aria-label': 'Move step up', title: 'Move up' }, '↑'),
        h('button', { type: 'button', class: 'icon move-down', disabled: last, 'aria-label': 'Move step down', title: 'Move down' }, '↓'),
        h('button', { type: 'button', class: 'icon remove-step', 'aria-label': 'Remove step', title: 'Remove' }, '×'))),
    incoming.length ? h('div', { class: 'incoming' }, incoming.map((t) => h('span', { class: 'chip jump' }, `⤷ ${t}`))) : null);
  if (!type) {
    card.append(h('p', { class: 'message bad' }, 'Unknown step type: edit this step with Edit JSON.'));
    return card;
  }
  const config = isObj(step.config) ? step.config : {};
  const body = h('div', { class: 'step-config', 'data-anchor': 'config' });
  body.append(...CONFIG_FORMS[type](config, steps, i));
  const extra = Object.keys(config).filter((k) => !KNOWN_KEYS[type].includes(k));
  if (extra.length) body.append(h('p', { class: 'muted small' }, `Also in the JSON (not shown here): ${extra.join(', ')}`));
  card.append(body);
  return card;
}

/* ----- the five step forms: each returns the rows of its config ----- */

const CONFIG_FORMS = {
  condition(c, steps, i) {
    const route = (key) => selectIn(`config.${key}`, c[key] === undefined ? 'continue' : c[key],
      routeOptions(steps, i, true, 'continue'), { 'data-rerender': '' });
    return [
      row('Expression (CEL)', areaIn('config.expression', c.expression, { class: 'code', spellcheck: 'false' }),
        'Reads trigger, steps and instance, e.g. trigger.amount <= 1000'),
      h('div', { class: 'routes' },
        h('div', { class: 'route true' }, row('If true', route('if_true')), routeChip(c.if_true, steps, 'if_true')),
        h('div', { class: 'route false' }, row('If false', route('if_false')), routeChip(c.if_false, steps, 'if_false'))),
    ];
  },

  approval(c) {
    const timeout = c.on_timeout;
    const timeoutAction = isObj(timeout) ? timeout.action : timeout;
    const policy = c.reject_policy;
    const rows = [
      approverList('config.approvers', c.approvers, 'Approvers (any of them may decide)'),
      h('div', { class: 'inline-fields' },
        row('Approvals needed', numIn('config.min_approvals', c.min_approvals, { placeholder: '1' })),
        row('Timeout (hours)', numIn('config.timeout_hours', c.timeout_hours, { placeholder: 'none' })),
        row('or timeout', textIn('config.timeout', c.timeout, { 'data-optional': '', class: 'short', placeholder: '90m, 2d' })),
        row('Remind before', textIn('config.remind_before', c.remind_before, { 'data-optional': '', class: 'short', placeholder: '2h' }))),
      h('div', { class: 'inline-fields' },
        row('When the deadline passes', selectIn('config.on_timeout', timeoutAction === undefined ? '' : timeoutAction, [
          ['', 'reject (default)'], ['reject', 'reject'], ['escalate', 'escalate to other approvers'],
          ['notify', 'notify and keep waiting'], ['fail', 'fail the instance'], ['approve', 'approve automatically'],
        ], { 'data-kind': 'on-timeout', 'data-rerender': '' })),
        row('Rejections', selectIn('config.reject_policy', isObj(policy) ? 'min_rejections' : policy === undefined ? '' : policy, [
          ['', 'the first rejection rejects (default)'], ['any', 'any rejection rejects'], ['min_rejections', 'a minimum number of rejections'],
        ], { 'data-kind': 'reject-policy', 'data-rerender': '' })),
        isObj(policy) ? row('Minimum', numIn('config.reject_policy.min_rejections', policy.min_rejections)) : null),
      checkRow('A rejection needs a comment', boolIn('config.require_comment_on_reject', c.require_comment_on_reject)),
    ];
    if (isObj(timeout) && timeout.action === 'escalate') {
      rows.push(h('div', { class: 'nested', 'data-anchor': 'config.on_timeout' },
        h('div', { class: 'sub-head' }, h('span', {}, 'Escalation')),
        approverList('config.on_timeout.approvers', timeout.approvers, 'Escalate to'),
        h('div', { class: 'inline-fields' },
          row('New deadline', textIn('config.on_timeout.timeout', timeout.timeout, { class: 'short', placeholder: '24h' })),
          row('Max escalations', numIn('config.on_timeout.max_escalations', timeout.max_escalations, { placeholder: '1' })))));
    }
    rows.push(approvalNotify(c.notify));
    return rows;
  },

  action(c, steps, i) {
    return [
      h('div', { class: 'inline-fields' },
        row('Action', selectIn('config.action', c.action, ACTIONS.map((a) => [a, a]))),
        row('Attempts', numIn('config.max_attempts', c.max_attempts, { placeholder: '3' })),
        row('If it fails for good', selectIn('config.on_failure', c.on_failure === undefined ? 'fail' : c.on_failure,
          routeOptions(steps, i, false, 'fail'), { 'data-rerender': '' }))),
      row('Params (JSON object)', jsonIn('config.params', c.params), 'Strings may hold {{ placeholders }}, e.g. "{{trigger.id}}"'),
    ];
  },

  wait(c, steps, i) {
    const mode = WAIT_MODES.find((m) => c[m] !== undefined && c[m] !== null) || 'duration';
    const rows = [row('Wait for', selectIn('', mode, [
      ['duration', 'a duration'], ['until', 'a time (expression)'], ['window', 'a business window'], ['signal', 'a named signal'],
    ], { 'data-kind': 'wait-mode', 'data-rerender': '', 'data-field': null, class: 'wait-mode' }))];
    if (mode === 'duration') {
      rows.push(row('Duration', textIn('config.duration', c.duration, { class: 'short', placeholder: '15m' }), '90s, 15m, 48h, 2d'));
    }
    if (mode === 'until') rows.push(row('Until (CEL, a timestamp)', areaIn('config.until', c.until, { class: 'code', spellcheck: 'false' })));
    if (mode === 'signal') {
      rows.push(row('Signal name', textIn('config.signal', c.signal, { placeholder: 'rate_locked' }),
        'POST /v1/workflows/instances/{id}/signals/{name} completes the wait'));
    }
    if (mode === 'window') rows.push(windowForm(isObj(c.window) ? c.window : {}));
    if (mode !== 'duration') {
      rows.push(h('div', { class: 'inline-fields' },
        row('Timeout', textIn('config.timeout', c.timeout, { 'data-optional': '', class: 'short', placeholder: 'none' })),
        row('On timeout', selectIn('config.on_timeout', c.on_timeout === undefined ? 'fail' : c.on_timeout,
          routeOptions(steps, i, false, 'fail'), { 'data-rerender': '' }))));
    }
    return rows;
  },

  notification(c, steps, i) {
    const email = c.channel === 'email';
    const rows = [row('Channel', selectIn('config.channel', c.channel, [['webhook', 'webhook'], ['email', 'email']],
      { 'data-kind': 'channel', 'data-rerender': '' }))];
    if (email) {
      rows.push(row('To', textIn('config.to', c.to, { placeholder: 'approvers@example.com' })),
        row('Subject', textIn('config.subject', c.subject)),
        row('Body', areaIn('config.body', c.body, { 'data-optional': '', rows: 3 })));
    } else {
      rows.push(row('URL', textIn('config.url', c.url, { placeholder: 'https://…' })),
        row('Event type', textIn('config.event', c.event, { 'data-optional': '', placeholder: 'workflow.notice' })),
        row('Payload (JSON)', jsonIn('config.payload', c.payload)));
    }
    const delivery = boolIn('config.wait_for_delivery', c.wait_for_delivery);
    delivery.dataset.rerender = ''; // the on_failure row follows it
    rows.push(checkRow('Wait until delivered', delivery));
    if (c.wait_for_delivery === true || c.on_failure !== undefined) {
      rows.push(row('If delivery fails', selectIn('config.on_failure', c.on_failure === undefined ? 'fail' : c.on_failure,
        routeOptions(steps, i, false, 'fail'), { 'data-rerender': '' })));
    }
    return rows;
  },
};

// "✓ true → skip to step 3 · Execute Payment": where a condition sends the instance.
function routeChip(route, steps, key) {
  const r = route === undefined ? 'continue' : route;
  const t = skipTarget(r);
  const named = { continue: 'next step', end: 'complete now', fail: 'fail' };
  const text = t !== null ? `skip to ${stepLabel(steps, t)}` : named[r] || str(r);
  const yes = key === 'if_true';
  return h('span', { class: `chip route-${yes}`, 'data-key': key }, `${yes ? '✓ true' : '✗ false'} → ${text}`);
}

// One approver object or an array of them; `data-field`s follow the document's shape
// (`config.approvers.type`, or `config.approvers[1].type` once there are several).
function approverList(base, approvers, label) {
  const list = Array.isArray(approvers) ? approvers : [isObj(approvers) ? approvers : {}];
  const box = h('div', { class: 'approvers', 'data-anchor': base },
    h('div', { class: 'sub-head' }, h('span', {}, label),
      h('button', { type: 'button', 'data-action': 'add-approver', 'data-base': base }, '+ approver')));
  list.forEach((a, k) => {
    const p = Array.isArray(approvers) ? `${base}[${k}]` : base;
    const entry = isObj(a) ? a : {};
    const bounded = entry.type === 'agent' || entry.max_amount !== undefined || entry.limit !== undefined;
    box.append(h('div', { class: 'approver-row', 'data-anchor': p.slice(base.length) ? p : null },
      row('Type', selectIn(`${p}.type`, entry.type, [['role', 'role'], ['user', 'user'], ['agent', 'agent']], { 'data-rerender': '' })),
      row({ role: 'Role', agent: 'Agent id' }[entry.type] || 'User id',
        textIn(`${p}.value`, entry.value, { placeholder: entry.type === 'role' ? 'e.g. cfo' : '' })),
      bounded ? row('Max amount', numIn(`${p}.max_amount`, entry.max_amount, { placeholder: 'no limit' })) : null,
      bounded ? row('Limit (CEL)', textIn(`${p}.limit`, entry.limit,
        { 'data-optional': '', class: 'code', placeholder: 'trigger.currency == "USD"' })) : null,
      list.length > 1 ? h('button', {
        type: 'button', class: 'icon', 'data-action': 'remove-approver', 'data-base': base, 'data-index': k, 'aria-label': 'Remove approver',
      }, '×') : null));
  });
  return box;
}

function approvalNotify(notify) {
  const n = isObj(notify) ? notify : {};
  const box = h('div', { class: 'nested', 'data-anchor': 'config.notify' },
    h('div', { class: 'sub-head' }, h('span', {}, 'Notify the approvers')),
    h('div', { class: 'inline-fields' },
      checkRow('by webhook', h('input', { type: 'checkbox', 'data-action': 'notify-webhook', checked: n.webhook !== undefined })),
      checkRow('by email', h('input', { type: 'checkbox', 'data-action': 'notify-email', checked: n.email !== undefined }))));
  if (n.webhook !== undefined) {
    const w = isObj(n.webhook) ? n.webhook : {};
    box.append(row('Webhook URL', textIn('config.notify.webhook.url', w.url, { placeholder: 'https://…' })),
      row('Webhook payload (JSON)', jsonIn('config.notify.webhook.payload', w.payload)));
  }
  if (n.email !== undefined) {
    const e = isObj(n.email) ? n.email : {};
    box.append(h('div', { class: 'inline-fields' },
      row('Email to', textIn('config.notify.email.to', e.to)),
      row('Subject', textIn('config.notify.email.subject', e.subject))),
    row('Body', areaIn('config.notify.email.body', e.body, { 'data-optional': '' })));
  }
  return box;
}

function windowForm(w) {
  const days = Array.isArray(w.days) ? w.days : [];
  return h('div', { class: 'nested', 'data-anchor': 'config.window' },
    h('div', { class: 'field' }, h('span', { class: 'label' }, 'Days'),
      h('div', { class: 'days' }, DAYS.map((d) => checkRow(d,
        h('input', { type: 'checkbox', 'data-field': 'config.window.days', 'data-kind': 'days', value: d, checked: days.includes(d) }))))),
    h('div', { class: 'inline-fields' },
      row('From', textIn('config.window.from', w.from, { class: 'short', placeholder: '09:00' })),
      row('To', textIn('config.window.to', w.to, { class: 'short', placeholder: '17:00' })),
      row('Time zone', textIn('config.window.tz', w.tz, { placeholder: 'America/New_York' }))));
}

/* ----- builder events ----- */

// The object a control edits: its step, or the document for template-level fields.
function targetOf(el) {
  const card = el.closest('.step-card');
  return card ? stepsOf(state.builder.doc)[Number(card.dataset.stepIndex)] : state.builder.doc;
}

function readControl(el) {
  const kind = el.dataset.kind;
  if (kind === 'bool') return el.checked;
  if (kind === 'num') {
    const t = el.value.trim();
    // Not a number: kept as typed so the API names the problem at this field.
    return t === '' ? undefined : Number.isFinite(Number(t)) ? Number(t) : el.value;
  }
  if (kind === 'loose') return parseLoose(el.value);
  if (kind === 'bool-text') return el.value === '' ? undefined : el.value === 'true';
  if (kind === 'days') return $$(`[data-field="config.window.days"]`, el.closest('.step-card')).filter((c) => c.checked).map((c) => c.value);
  return el.value === '' && 'optional' in el.dataset ? undefined : el.value;
}

// Selects whose choice reshapes the document rather than setting one value.
const RESHAPE = {
  'wait-mode'(step, _field, mode) {
    const c = cfgOf(step);
    for (const m of WAIT_MODES) if (m !== mode) delete c[m];
    if (mode === 'duration') { delete c.timeout; delete c.on_timeout; }
    if (c[mode] === undefined) {
      c[mode] = mode === 'window' ? { days: DAYS.slice(0, 5), from: '09:00', to: '17:00', tz: 'UTC' } : mode === 'duration' ? '1h' : '';
    }
  },
  channel(step, _field, channel) {
    const c = cfgOf(step);
    const drop = channel === 'email' ? ['url', 'event', 'payload'] : ['to', 'subject', 'body'];
    for (const k of drop) delete c[k];
    c.channel = channel;
    if (channel === 'email') { c.to = c.to ?? ''; c.subject = c.subject ?? ''; } else c.url = c.url ?? '';
  },
  'on-timeout'(step, _field, action) {
    const c = cfgOf(step);
    if (action === '') delete c.on_timeout;
    else if (action !== 'escalate') c.on_timeout = action;
    else if (!(isObj(c.on_timeout) && c.on_timeout.action === 'escalate')) {
      c.on_timeout = { action: 'escalate', approvers: { type: 'role', value: '' }, timeout: '24h', max_escalations: 1 };
    }
  },
  'reject-policy'(step, _field, policy) {
    const c = cfgOf(step);
    if (policy === '') delete c.reject_policy;
    else if (policy === 'any') c.reject_policy = 'any';
    else if (!isObj(c.reject_policy)) c.reject_policy = { min_rejections: 2 };
  },
  // A trigger op constrains its value's type: keep the value only where it still fits.
  op(doc, field, op) {
    const cond = getPath(doc, field.replace(/\.op$/, ''));
    cond.op = op;
    const v = cond.value;
    if (op === 'exists') { if (typeof v !== 'boolean') delete cond.value; } else if (op === 'in' || op === 'not_in') {
      if (!Array.isArray(v)) cond.value = v === undefined ? [] : [v];
    } else if (Array.isArray(v) || typeof v === 'boolean') delete cond.value;
  },
};

function onFieldEvent(event) {
  const el = event.target;
  const field = el.dataset && el.dataset.field;
  const kind = el.dataset && el.dataset.kind;
  if (field === undefined && kind !== 'wait-mode') return;
  // Text fields write on `input` (and again, harmlessly, on `change`, which is all some
  // automation fires); selects and checkboxes write on `change` only.
  const typing = el.tagName === 'TEXTAREA' || (el.tagName === 'INPUT' && el.type !== 'checkbox');
  if (event.type === 'input' && !typing) return;
  const target = targetOf(el);
  if (!target) return;
  if (kind === 'json') {
    writeJsonField(el, target);
  } else if (RESHAPE[kind]) {
    RESHAPE[kind](target, field, el.value);
  } else {
    setPath(target, field, readControl(el));
  }
  if ('rerender' in el.dataset) renderBuilder();
  else {
    if ('labels' in el.dataset) refreshLabels();
    updatePreview();
  }
}

// Step names appear in route choices and chips; update them in place while a name is typed
// (a re-render would replace the control being typed in, or a button about to be clicked).
function refreshLabels() {
  const steps = stepsOf(state.builder.doc);
  for (const opt of $$('#flow option')) {
    const t = skipTarget(opt.value);
    if (t !== null) opt.textContent = `skip to ${stepLabel(steps, t)}`;
  }
  for (const chip of $$('#flow .chip[data-key]')) {
    const step = steps[Number(chip.closest('.step-card').dataset.stepIndex)];
    chip.replaceWith(routeChip(step.config[chip.dataset.key], steps, chip.dataset.key));
  }
}

// A JSON textarea writes only valid JSON. Until the text parses it is kept as a draft (shown
// again after a re-render) with the reason it is not applied, and saving waits for it.
function writeJsonField(el, target) {
  const abs = absPath(el);
  const text = el.value.trim();
  try {
    setPath(target, el.dataset.field, text === '' ? undefined : JSON.parse(text));
    state.builder.drafts.delete(abs);
    if (!state.builder.drafts.size && $('#builder-status').textContent.startsWith('Fix the JSON')) setStatus('');
  } catch (e) {
    state.builder.drafts.set(abs, { text: el.value, problem: e.message });
  }
  showDraft(el);
}

function showDraft(el) {
  const draft = state.builder.drafts.get(absPath(el));
  const field = el.closest('.field');
  const old = $('.local-error', field);
  if (old) old.remove();
  if (!draft) { el.removeAttribute('aria-invalid'); return; }
  if (el.value !== draft.text) el.value = draft.text;
  el.setAttribute('aria-invalid', 'true');
  field.append(h('div', { class: 'local-error' }, `not valid JSON yet (${draft.problem}); the last valid value is kept`));
}

function onBuilderClick(event) {
  const btn = event.target.closest('button, input[data-action]');
  if (!btn || btn.disabled) return;
  const card = btn.closest('.step-card');
  const doc = state.builder.doc;
  const i = card ? Number(card.dataset.stepIndex) : -1;
  if (btn.classList.contains('move-up')) moveStep(i, i - 1);
  else if (btn.classList.contains('move-down')) moveStep(i, i + 1);
  else if (btn.classList.contains('remove-step')) removeStep(i);
  else if (btn.dataset.action) {
    const target = card ? stepsOf(doc)[i] : doc;
    ACTIONS_BY_NAME[btn.dataset.action](target, btn);
    renderBuilder();
  }
}

const ACTIONS_BY_NAME = {
  'add-condition'(doc) {
    if (!isObj(doc.trigger_config)) doc.trigger_config = {};
    if (!Array.isArray(doc.trigger_config.conditions)) doc.trigger_config.conditions = [];
    doc.trigger_config.conditions.push({ field: '', op: 'eq', value: '' });
  },
  'remove-condition'(doc, btn) {
    const conds = doc.trigger_config.conditions;
    conds.splice(Number(btn.dataset.index), 1);
    resetPaths();
  },
  'add-approver'(step, btn) {
    const cur = getPath(step, btn.dataset.base);
    const add = { type: 'role', value: '' };
    setPath(step, btn.dataset.base, Array.isArray(cur) ? [...cur, add] : isObj(cur) ? [cur, add] : [add]);
    resetPaths();
  },
  'remove-approver'(step, btn) {
    getPath(step, btn.dataset.base).splice(Number(btn.dataset.index), 1);
    resetPaths();
  },
  'notify-webhook'(step, box) { toggleNotify(step, 'webhook', box.checked, { url: '' }); },
  'notify-email'(step, box) { toggleNotify(step, 'email', box.checked, { to: '', subject: '' }); },
};

function toggleNotify(step, channel, on, fresh) {
  const c = cfgOf(step);
  if (on) {
    if (!isObj(c.notify)) c.notify = {};
    if (c.notify[channel] === undefined) c.notify[channel] = fresh;
  } else if (isObj(c.notify)) {
    delete c.notify[channel];
    if (!Object.keys(c.notify).length) delete c.notify;
  }
}

function addStep() {
  const b = state.builder;
  if (b.doc.steps === undefined) b.doc.steps = [];
  if (!Array.isArray(b.doc.steps)) { setStatus('“steps” is not an array: fix it with Edit JSON first.', 'bad'); return; }
  const type = $('#add-step-type').value;
  const base = type[0].toUpperCase() + type.slice(1);
  const names = new Set(b.doc.steps.map((s) => isObj(s) && s.name));
  let name = base;
  for (let n = 2; names.has(name); n++) name = `${base} ${n}`;
  b.doc.steps.push({ type, name, config: defaultConfig(type) });
  renderBuilder();
  const card = $(`.step-card[data-step-index="${b.doc.steps.length - 1}"]`);
  card.scrollIntoView({ block: 'nearest' });
  $('.step-name', card).focus();
}

// Renumber every `skip_to:N` route through `map` (old index -> new index).
function remapRoutes(steps, map) {
  for (const s of steps) {
    if (!isObj(s) || !isObj(s.config)) continue;
    for (const key of Object.keys(ROUTE_KEYS[s.type] || {})) {
      const t = skipTarget(s.config[key]);
      if (t !== null) s.config[key] = `skip_to:${map(t)}`;
    }
  }
}

// `steps["N"]` in an expression or a {{ }} placeholder names a step by its index: when steps
// move, rewrite it as the routes are, so it still names the same step. Returns how many named
// `removed` (left as they are, for the user to fix: nothing can stand in for a deleted step).
const STEP_REF = /steps\[\s*(["'])(\d+)\1\s*\]/g;

function remapStepRefs(steps, map, removed) {
  let dangling = 0;
  const rewrite = (v) => {
    if (typeof v === 'string') {
      return v.replace(STEP_REF, (ref, quote, n) => {
        const t = Number(n);
        if (t === removed) { dangling += 1; return ref; }
        return `steps[${quote}${map(t)}${quote}]`;
      });
    }
    if (Array.isArray(v)) return v.map(rewrite);
    if (isObj(v)) { for (const k of Object.keys(v)) v[k] = rewrite(v[k]); }
    return v;
  };
  for (const s of steps) if (isObj(s) && isObj(s.config)) rewrite(s.config);
  return dangling;
}

function moveStep(from, to) {
  const steps = stepsOf(state.builder.doc);
  if (to < 0 || to >= steps.length) return;
  [steps[from], steps[to]] = [steps[to], steps[from]];
  const swap = (t) => (t === from ? to : t === to ? from : t);
  remapRoutes(steps, swap);
  remapStepRefs(steps, swap);
  resetPaths();
  renderBuilder();
  const btn = $(`.step-card[data-step-index="${to}"] ${to < from ? '.move-up' : '.move-down'}`);
  if (btn && !btn.disabled) btn.focus();
}

function removeStep(i) {
  const steps = stepsOf(state.builder.doc);
  steps.splice(i, 1);
  // A jump to the removed step now lands on the step that followed it.
  remapRoutes(steps, (t) => (t > i ? t - 1 : t));
  const dangling = remapStepRefs(steps, (t) => (t > i ? t - 1 : t), i);
  resetPaths();
  renderBuilder();
  if (dangling) setStatus(`${dangling} reference(s) to the removed step (steps["${i}"]) remain: they now name the step after it. Fix them before saving.`, 'bad');
}

// Keep the focused control focused across a re-render (same card, same field).
function focusKey() {
  const el = document.activeElement;
  if (!el || !$('#builder-form').contains(el) || !el.dataset) return null;
  const card = el.closest('.step-card');
  return { card: card ? card.dataset.stepIndex : null, field: el.dataset.field, kind: el.dataset.kind, value: el.value };
}

function restoreFocus(key) {
  if (!key || !key.field && key.kind !== 'wait-mode') return;
  const scope = key.card === null ? $('#builder-form') : $(`.step-card[data-step-index="${key.card}"]`);
  if (!scope) return;
  const sel = key.field !== undefined ? `[data-field="${CSS.escape(key.field)}"]` : '.wait-mode';
  const candidates = $$(sel, scope).filter((el) => key.card !== null || !el.closest('.step-card'));
  const el = candidates.find((c) => c.value === key.value) || candidates[0];
  if (el) el.focus();
}

function updatePreview() {
  const b = state.builder;
  const text = pretty(b.doc);
  $('#tpl-json').textContent = text;
  const dirty = b.saved === null ? stepsOf(b.doc).length > 0 || b.doc.name : JSON.stringify(b.doc) !== b.saved;
  $('#save-template').textContent = dirty ? 'Save*' : 'Save';
  $('#save-template').title = dirty ? 'Unsaved changes' : '';
}

/* ----- validation errors next to their fields ----- */

// The JSON path a control or anchor stands for, e.g. `$.steps[2].config.expression`.
function absPath(el) {
  const card = el.closest('.step-card');
  const rel = el.dataset.field !== undefined ? el.dataset.field : el.dataset.anchor;
  const base = card ? `$.steps[${card.dataset.stepIndex}]` : '$';
  return rel ? `${base}.${rel}` : base;
}

// `$.a.b[2]['x y']` -> `$.a.b[2]`; null at the root (or for a path that is not JSONPath).
function parentPath(p) {
  const m = /(\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\]|\['(?:[^'\\]|\\.)*'\])$/.exec(p);
  return m && m.index > 0 ? p.slice(0, m.index) : null;
}

function clearErrors() {
  state.builder.errors = [];
}

// After steps move or the whole document changes, paths no longer name the same thing.
function resetPaths() {
  state.builder.errors = [];
  state.builder.drafts.clear();
}

// Each problem goes beside the control of its path (or of the nearest enclosing path the form
// shows: a step card, an approvers block); problems with no place in the form go on top.
function applyErrors() {
  const form = $('#builder-form');
  for (const el of $$('.field-error', form)) el.remove();
  for (const el of $$('[aria-invalid]', form)) if (!state.builder.drafts.has(absPath(el))) el.removeAttribute('aria-invalid');
  const places = new Map();
  for (const el of $$('[data-field], [data-anchor]', form)) {
    const p = absPath(el);
    if (!places.has(p)) places.set(p, []);
    places.get(p).push(el);
  }
  const top = [];
  for (const d of state.builder.errors) {
    let p = d.path;
    while (p && !places.has(p)) p = parentPath(p);
    const msg = h('div', { class: 'field-error', 'data-path': d.path, id: fid() });
    if (!p) {
      msg.append(h('code', {}, d.path), ` ${d.problem}`);
      top.push(h('li', {}, msg));
      continue;
    }
    msg.append(p === d.path ? d.problem : `${d.path.slice(p.length).replace(/^\./, '')}: ${d.problem}`);
    const [first, ...rest] = places.get(p);
    if (first.matches('input, select, textarea')) {
      for (const el of [first, ...rest]) el.setAttribute('aria-invalid', 'true');
      first.setAttribute('aria-describedby', msg.id);
      const slot = first.dataset.kind === 'days' ? first.closest('.days').parentElement : first.closest('.field');
      (slot || first.parentElement).append(msg);
    } else if (first.classList.contains('step-card')) {
      $('.step-head', first).after(msg);
    } else {
      first.prepend(msg);
    }
  }
  const list = clear($('#builder-errors'));
  list.append(...top);
  list.hidden = top.length === 0;
}

/* ----- save, versions, JSON mode ----- */

async function saveTemplate() {
  const b = state.builder;
  if (b.editing) { setStatus('Apply or cancel the JSON edit first.', 'bad'); return; }
  if (b.drafts.size) {
    setStatus(`Fix the JSON at ${[...b.drafts.keys()].join(', ')} first.`, 'bad');
    return;
  }
  clearErrors();
  applyErrors();
  setStatus('Saving…');
  const path = b.id ? `/v1/workflows/templates/${encodeURIComponent(b.id)}` : '/v1/workflows/templates';
  let view;
  try {
    view = await api(b.id ? 'PUT' : 'POST', path, b.doc);
  } catch (err) {
    if (!(err instanceof ApiError)) throw err;
    if (err.status === 401 || state.builder !== b) return;
    b.errors = err.details;
    applyErrors();
    const where = err.details.length ? ` See the ${err.details.length} marked problem(s).` : '';
    setStatus(`Not saved: ${err.code}: ${err.message}.${where}${err.requestId ? ` (request id ${err.requestId})` : ''}`, 'bad');
    const firstBad = $('[aria-invalid="true"], #builder-errors:not([hidden])');
    if (firstBad) firstBad.scrollIntoView({ block: 'center' });
    return;
  }
  if (state.builder !== b) return; // the user opened another template meanwhile
  const isNew = !b.id;
  takeSaved(view);
  renderBuilder();
  renderBuilderHead();
  setStatus(`Saved “${view.name}” as version ${view.version}.`, 'ok');
  if (isNew || location.hash !== `#/builder/${view.id}`) {
    b.keepOnLoad = true;
    location.hash = `#/builder/${encodeURIComponent(view.id)}`;
  }
}

// Load an older version into the form; saving it makes it the newest version.
function pickVersion() {
  const b = state.builder;
  const v = $('#tpl-versions').value;
  const version = b.versions.find((x) => String(x.version) === v) || b.versions[b.versions.length - 1];
  if (!version) return;
  b.doc = structuredClone(version.definition);
  resetPaths();
  renderBuilder();
  setStatus(v ? `Version ${v} is in the form: Save to make it version ${b.version + 1}.` : '');
}

function setJsonEditing(on) {
  const b = state.builder;
  if (b) b.editing = on;
  $('#tpl-json').hidden = on;
  $('#tpl-json-edit').hidden = !on;
  $('#json-edit').hidden = on;
  $('#json-apply').hidden = !on;
  $('#json-cancel').hidden = !on;
  $('#builder-form').inert = on;
  $('#json-message').textContent = on ? 'Edit the document, then apply it to the form.' : '';
  $('#json-message').className = 'message';
  if (on) {
    const area = $('#tpl-json-edit');
    area.value = pretty(b.doc);
    area.focus();
  }
}

function applyJson() {
  const msg = $('#json-message');
  let doc;
  try {
    doc = JSON.parse($('#tpl-json-edit').value);
  } catch (e) {
    msg.textContent = `Not valid JSON: ${e.message}`;
    msg.className = 'message bad';
    return;
  }
  if (!isObj(doc)) {
    msg.textContent = 'A template is a JSON object ({ … }).';
    msg.className = 'message bad';
    return;
  }
  state.builder.doc = doc;
  resetPaths();
  setJsonEditing(false);
  renderBuilder();
}

/* ---------- instances ---------- */

async function showInstances(query) {
  const filter = { status: query.get('status') || '', template_id: query.get('template_id') || '' };
  state.instances = { filter, cursors: [null], page: 0 };
  $('#instances-status').value = filter.status;
  await loadTemplates();
  fillTemplateSelect($('#instances-template'), filter.template_id, 'all templates');
  fillTemplateSelect($('#start-template'), filter.template_id || $('#start-template').value);
  await loadInstancesPage();
}

async function loadInstancesPage() {
  const seq = state.seq;
  const s = state.instances;
  const page = await api('GET', `/v1/workflows/instances${qs({ ...s.filter, limit: 25, cursor: s.cursors[s.page] })}`);
  if (seq !== state.seq) return;
  s.cursors[s.page + 1] = page.next_cursor;
  const body = clear($('#instances tbody'));
  for (const inst of page.data) body.append(instanceRow(inst));
  $('#instances-empty').hidden = page.data.length > 0;
  $('#instances-prev').disabled = s.page === 0;
  $('#instances-next').disabled = !page.next_cursor;
  $('#instances-page').textContent = `page ${s.page + 1}`;
}

function instanceRow(inst) {
  const w = inst.waiting_on;
  const cur = inst.current_step;
  return h('tr', { 'data-instance-id': inst.id },
    h('td', { class: 'id' }, h('a', { href: `#/instances/${encodeURIComponent(inst.id)}`, title: inst.id }, shortId(inst.id)),
      inst.mode === 'simulate' ? badge('simulate', 'mode') : null),
    h('td', {}, templateName(inst.template_id), h('span', { class: 'muted' }, ` v${inst.template_version}`)),
    h('td', { class: 'status' }, badge(inst.status)),
    h('td', { class: 'current' }, cur ? `${cur.index} · ${cur.name}` : '—'),
    h('td', { class: 'waiting-on' }, w ? [w.description, h('span', { class: 'muted' }, ` since ${relative(w.since)}`)] : '—'),
    h('td', {}, timeCell(inst.created_at)),
    h('td', {}, timeCell(inst.updated_at)));
}

function filterInstances(event) {
  event.preventDefault();
  const q = qs({ status: $('#instances-status').value, template_id: $('#instances-template').value });
  const target = `#/instances${q}`;
  if (location.hash === target) route(); else location.hash = target;
}

function pageInstances(delta) {
  const s = state.instances;
  if (s.page + delta < 0 || (delta > 0 && !s.cursors[s.page + 1])) return;
  s.page += delta;
  guard(loadInstancesPage)();
}

// Download what the filter selects as CSV (GET /v1/workflows/reports/instances, its first
// 10,000 rows), through a blob: the call needs the key, which a plain link cannot send.
async function exportInstances() {
  const msg = $('#instances-export-status');
  msg.textContent = 'Exporting…';
  const { text, headers } = await request('GET', `/v1/workflows/reports/instances${qs(state.instances.filter)}`);
  const link = h('a', { href: URL.createObjectURL(new Blob([text], { type: 'text/csv' })), download: 'workflow-instances.csv' });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 10000);
  const rows = headers.get('x-row-count') || '0';
  msg.textContent = `${rows} instance(s) exported${headers.get('x-next-cursor') ? ' (the newest 10,000: narrow the filter for the rest)' : ''}.`;
}

async function startInstance(event) {
  event.preventDefault();
  const msg = $('#start-message');
  let trigger;
  try {
    trigger = JSON.parse($('#start-trigger').value || '{}');
  } catch (e) {
    msg.textContent = `The trigger is not valid JSON: ${e.message}`;
    return;
  }
  msg.textContent = 'Starting…';
  const body = { template_id: $('#start-template').value, trigger, mode: $('#start-mode').value };
  try {
    const inst = await api('POST', '/v1/workflows/instances', body);
    msg.textContent = '';
    location.hash = `#/instances/${encodeURIComponent(inst.id)}`;
  } catch (err) {
    msg.textContent = `${err.code}: ${err.message}${err.details.map((d) => ` (${d.path}: ${d.problem})`).join('')}`;
  }
}

/* ---------- one instance: where is it, who is blocking ---------- */

const TERMINAL = ['completed', 'rejected', 'failed', 'cancelled'];

async function showInstance(id) {
  const seq = state.seq;
  $('#instance-id').textContent = id;
  // Never show the previous instance under this id while (or if) this one fails to load.
  for (const sel of ['#instance-summary', '#instance-waiting-on', '#instance-steps', '#instance-trigger', '#instance-events tbody', '#instance-chain']) {
    clear($(sel));
  }
  $('#cancel-box').hidden = true;
  const [inst, events] = await Promise.all([
    api('GET', `/v1/workflows/instances/${encodeURIComponent(id)}`),
    api('GET', `/v1/workflows/instances/${encodeURIComponent(id)}/events`).catch((e) => { showError(e); return null; }),
  ]);
  const definition = await templateDefinition(inst.template_id, inst.template_version).catch(() => null);
  if (seq !== state.seq) return;
  renderInstance(inst, definition);
  renderEvents(events);
}

// The template version an instance runs, for the steps it has not reached yet.
async function templateDefinition(id, version) {
  const key = `${id}@${version}`;
  if (!state.definitions.has(key)) {
    const v = await api('GET', `/v1/workflows/templates/${encodeURIComponent(id)}/versions/${version}`);
    state.definitions.set(key, v.definition);
  }
  return state.definitions.get(key) || null;
}

function renderInstance(inst, definition) {
  state.detail = inst;
  const terminal = TERMINAL.includes(inst.status);
  $('#cancel-box').hidden = terminal;
  const facts = [
    ['Status', h('span', { id: 'instance-status', class: `badge ${inst.status}` }, inst.status)],
    ['Template', h('a', { href: `#/builder/${encodeURIComponent(inst.template_id)}` }, templateName(inst.template_id)), ` v${inst.template_version}`],
    ['Current step', inst.current_step ? `${inst.current_step.index} · ${inst.current_step.name} (${inst.current_step.type})` : '—'],
    ['Mode', inst.mode],
    ['Started by', `${inst.created_by.id} (${inst.created_by.type})`],
    ['Created', timeCell(inst.created_at), h('span', { class: 'muted' }, ` ${relative(inst.created_at)}`)],
    ['Updated', timeCell(inst.updated_at)],
    ['Finished', inst.finished_at ? timeCell(inst.finished_at) : '—'],
  ];
  if (inst.idempotency_key) facts.push(['Idempotency key', inst.idempotency_key]);
  if (inst.error) facts.push(['Error', h('span', { class: 'bad' }, inst.error)]);
  clear($('#instance-summary')).append(...facts.flatMap(([k, ...v]) => [h('dt', {}, k), h('dd', {}, ...v)]));
  renderWaitingOn(inst);
  renderTimeline(inst, definition);
  $('#instance-trigger').textContent = pretty(inst.trigger);
}

function renderWaitingOn(inst) {
  const box = clear($('#instance-waiting-on'));
  const w = inst.waiting_on;
  box.append(h('h2', {}, 'Waiting on'));
  if (!w) {
    box.append(h('p', { class: 'muted' }, TERMINAL.includes(inst.status)
      ? `Nothing: the instance is ${inst.status}.`
      : 'Nothing: a step is running.'));
    return;
  }
  const overdue = w.due && new Date(w.due).getTime() < Date.now();
  box.append(
    h('p', { class: 'blocking' }, badge(w.kind, 'kind'), ' ', w.description),
    h('dl', { class: 'facts' },
      h('dt', {}, 'Step'), h('dd', {}, String(w.step_index)),
      h('dt', {}, 'Since'), h('dd', {}, timeCell(w.since), h('span', { class: 'muted' }, ` (${relative(w.since)})`)),
      h('dt', {}, 'Due'), h('dd', { class: overdue ? 'bad' : '' },
        w.due ? [timeCell(w.due), ` (${overdue ? 'overdue, ' : ''}${relative(w.due)})`] : 'no deadline')));
  const d = isObj(w.detail) ? w.detail : {};
  if (Array.isArray(d.approvers)) {
    box.append(h('p', {}, 'Who can decide: ', d.approvers.map((a) => h('span', { class: 'chip' }, `${a.type} ${a.value}`)),
      d.approvals_needed !== undefined ? h('span', { class: 'muted' }, ` · ${d.approvals_needed} more approval(s) needed`) : null));
  }
  if (Array.isArray(d.decisions) && d.decisions.length) {
    box.append(h('ul', { class: 'decisions' }, d.decisions.map((x) => h('li', {}, isObj(x)
      ? `${str(x.verdict || x.decision)} by ${str(x.actor && x.actor.id || x.actor)}${x.comment ? `: “${x.comment}”` : ''}`
      : str(x)))));
  }
  box.append(jsonDetails('detail', w.detail));
}

function renderTimeline(inst, definition) {
  const list = clear($('#instance-steps'));
  const planned = definition && Array.isArray(definition.steps) ? definition.steps : [];
  const count = Math.max(planned.length, ...inst.steps.map((s) => s.index + 1), 0);
  const byIndex = new Map(inst.steps.map((s) => [s.index, s]));
  for (let i = 0; i < count; i++) {
    const s = byIndex.get(i);
    const plan = planned[i] || {};
    const status = s ? s.status : 'not reached';
    const current = inst.current_step && inst.current_step.index === i;
    const duration = s && s.started_at && s.finished_at ? new Date(s.finished_at) - new Date(s.started_at) : null;
    list.append(h('li', { 'data-step-index': i, class: `${current ? 'current ' : ''}st-${status.replace(' ', '-')}` },
      h('div', { class: 'tl-head' },
        h('span', { class: `step-status badge ${status.replace(' ', '-')}` }, status),
        h('strong', {}, `${i} · ${s ? s.name : str(plan.name)}`),
        h('span', { class: 'muted' }, ` ${s ? s.type : str(plan.type)}`)),
      s ? h('div', { class: 'tl-meta muted' }, joinParts([
        s.actor && `by ${s.actor.id} (${s.actor.type})`,
        s.started_at && ['started ', timeCell(s.started_at)],
        s.finished_at && ['finished ', timeCell(s.finished_at)],
        duration !== null && `took ${fmtDuration(duration)}`,
      ])) : null,
      s && s.error ? h('div', { class: 'bad' }, s.error) : null,
      s && s.output !== null && s.output !== undefined ? jsonDetails('output', s.output) : null,
      s && s.input ? jsonDetails('input', s.input) : null));
  }
}

// The truthy parts, separated by " · ".
const joinParts = (parts) => parts.filter(Boolean).flatMap((p, i) => (i ? [' · ', p] : [p]));

function renderEvents(events) {
  const chain = $('#instance-chain');
  const body = clear($('#instance-events tbody'));
  if (!events) { chain.textContent = ''; return; }
  chain.className = `chain ${events.chain.verified ? 'ok' : 'bad'}`;
  chain.textContent = events.chain.verified
    ? `hash chain verified · ${events.chain.events} events`
    : `hash chain broken: ${events.chain.problem}`;
  for (const e of events.data) {
    const after = isObj(e.after) ? e.after : {};
    const summary = [after.index !== undefined ? `step ${after.index}` : '', after.status || '', e.reason ? `“${e.reason}”` : '']
      .filter(Boolean).join(' · ');
    body.append(h('tr', {},
      h('td', { class: 'num' }, e.seq),
      h('td', {}, timeCell(e.at)),
      h('td', {}, e.actor.id),
      h('td', {}, h('code', {}, e.kind)),
      h('td', {}, summary, jsonDetails('change', { before: e.before, after: e.after }))));
  }
}

async function cancelInstance() {
  const inst = state.detail;
  if (!inst) return;
  const seq = state.seq;
  const reason = $('#cancel-reason').value.trim();
  const updated = await api('POST', `/v1/workflows/instances/${encodeURIComponent(inst.id)}/cancel`, reason ? { reason } : {});
  if (seq !== state.seq) return;
  $('#cancel-reason').value = '';
  renderInstance(updated, state.definitions.get(`${updated.template_id}@${updated.template_version}`));
  const events = await api('GET', `/v1/workflows/instances/${encodeURIComponent(inst.id)}/events`);
  if (seq === state.seq) renderEvents(events);
}

/* ---------- pending approvals ---------- */

async function showPending(more) {
  const seq = state.seq;
  const cursor = more ? state.pendingCursor : null;
  const page = await api('GET', `/v1/workflows/pending${qs({ limit: 50, cursor })}`);
  if (seq !== state.seq) return;
  const body = $('#pending tbody');
  if (!more) clear(body);
  for (const item of page.data) body.append(pendingRow(item));
  state.pendingCursor = page.next_cursor;
  $('#pending-more').hidden = !page.next_cursor;
  $('#pending-empty').hidden = body.children.length > 0;
}

function pendingRow(item) {
  const t = item.trigger || {};
  const amount = t.amount === null || t.amount === undefined ? '—'
    : `${typeof t.amount === 'number' ? t.amount.toLocaleString() : str(t.amount)} ${t.currency || ''}`;
  const comment = h('input', { type: 'text', class: 'comment', maxlength: 2000, placeholder: 'comment (optional)', 'aria-label': 'Comment' });
  const tr = h('tr', { 'data-instance-id': item.instance_id, 'data-step-index': item.step_index },
    h('td', {}, h('a', { href: `#/instances/${encodeURIComponent(item.instance_id)}`, title: item.instance_id }, shortId(item.instance_id))),
    h('td', {}, item.template_name, h('span', { class: 'muted' }, ` v${item.template_version}`)),
    h('td', {}, `${item.step_index} · ${item.step_name}`),
    h('td', { class: 'num' }, amount),
    h('td', {}, t.requester ? `${t.requester} (started by ${item.started_by})` : item.started_by),
    h('td', {}, timeCell(item.waiting_since), h('div', { class: 'muted' }, relative(item.waiting_since))),
    h('td', {}, item.due_at ? [timeCell(item.due_at), h('div', { class: 'muted' }, relative(item.due_at))] : '—'),
    h('td', {}, comment));
  const approve = h('button', {
    type: 'button', class: 'approve primary', disabled: !item.may_approve,
    title: item.may_approve ? '' : 'you may only reject this one (outside your approval limit)',
  }, 'Approve');
  const reject = h('button', { type: 'button', class: 'reject danger' }, 'Reject');
  const cell = h('td', { class: 'decide' }, approve, ' ', reject);
  approve.addEventListener('click', () => decide(tr, 'approve'));
  reject.addEventListener('click', () => decide(tr, 'reject'));
  tr.append(cell);
  return tr;
}

// Approve or reject from the inbox; the outcome (or the refusal) is shown in the row itself.
async function decide(tr, verdict) {
  const buttons = $$('button', tr);
  const comment = $('.comment', tr).value.trim();
  const cell = $('.decide', tr);
  const old = $('.decision-result', tr);
  if (old) old.remove();
  buttons.forEach((b) => { b.disabled = true; });
  const result = h('div', { class: 'decision-result', role: 'status' });
  const path = `/v1/workflows/instances/${encodeURIComponent(tr.dataset.instanceId)}/steps/${tr.dataset.stepIndex}/${verdict}`;
  try {
    const res = await request('POST', path, comment ? { comment } : {});
    if (res.status === 202) {
      result.append(`queued: decision ${res.data.decision_id} will be applied in order`);
    } else {
      result.classList.add('ok');
      result.append(`${res.data.decision} · instance ${res.data.instance.status}`);
    }
    $('.comment', tr).disabled = true;
  } catch (err) {
    if (err.status === 401) return;
    result.classList.add('bad');
    result.append(h('strong', {}, err.code), `: ${err.message}`);
    buttons.forEach((b) => { b.disabled = b.classList.contains('approve') && b.title !== ''; });
  }
  cell.append(result);
}

/* ---------- analytics ---------- */

async function showAnalytics() {
  await loadTemplates();
  fillTemplateSelect($('#an-template'), $('#an-template').value, 'all templates');
  await loadAnalytics();
}

// A date input's day as an RFC 3339 instant at the start (or end) of that local day.
function dayBound(value, end) {
  if (!value) return '';
  const [y, m, d] = value.split('-').map(Number);
  return (end ? new Date(y, m - 1, d, 23, 59, 59, 999) : new Date(y, m - 1, d)).toISOString();
}

async function loadAnalytics() {
  const seq = state.seq;
  const msg = $('#analytics-message');
  msg.textContent = 'Loading…';
  const query = qs({
    template_id: $('#an-template').value,
    created_from: dayBound($('#an-from').value, false),
    created_to: dayBound($('#an-to').value, true),
  });
  let data;
  try {
    data = await api('GET', `/v1/workflows/analytics${query}`);
  } catch (err) {
    if (seq !== state.seq) return;
    msg.textContent = err.status === 404 && err.message === 'no such endpoint'
      ? 'This server does not offer analytics yet.' : '';
    if (!msg.textContent) showError(err);
    return;
  }
  if (seq !== state.seq) return;
  msg.textContent = '';
  renderTotals(data.totals);
  renderTemplateStats(data.templates || []);
  renderStepStats(data.steps || []);
}

function renderTotals(t) {
  const by = t.by_status || {};
  const tile = (label, value, extra) => h('div', { class: `tile ${extra || ''}` },
    h('div', { class: 'tile-value' }, value), h('div', { class: 'tile-label' }, label));
  clear($('#analytics-totals')).append(
    tile('instances', h('span', { id: 'total-instances' }, String(t.instances))),
    tile('completed', num(by.completed), 'completed'),
    tile('waiting', num(by.waiting), 'waiting'),
    tile('running', num(by.running), 'running'),
    tile('rejected', num(by.rejected), 'rejected'),
    tile('failed', num(by.failed), 'failed'),
    tile('cancelled', num(by.cancelled), 'cancelled'),
    tile('completion rate', pct(t.completion_rate)),
    tile(`avg duration (${num(t.duration_ms && t.duration_ms.count)} finished)`, fmtDuration(t.duration_ms && t.duration_ms.avg)),
    tile('longest', fmtDuration(t.duration_ms && t.duration_ms.max)));
}

function renderTemplateStats(rows) {
  const body = clear($('#analytics-templates tbody'));
  for (const r of rows) {
    const by = r.by_status || {};
    body.append(h('tr', { 'data-template-id': r.template_id },
      h('td', { class: 'name' },
        h('a', { href: `#/instances?template_id=${encodeURIComponent(r.template_id)}` }, r.name || templateName(r.template_id))),
      h('td', { class: 'instances num' }, num(r.instances)),
      h('td', { class: 'completed num' }, num(by.completed || 0)),
      h('td', { class: 'rejected num' }, num(by.rejected || 0)),
      h('td', { class: 'failed num' }, num(by.failed || 0)),
      h('td', { class: 'cancelled num' }, num(by.cancelled || 0)),
      h('td', { class: 'in-flight num' }, num((by.running || 0) + (by.waiting || 0))),
      h('td', { class: 'completion-rate num' }, pct(r.completion_rate)),
      h('td', { class: 'avg num' }, fmtDuration(r.duration_ms && r.duration_ms.avg)),
      h('td', { class: 'max num' }, fmtDuration(r.duration_ms && r.duration_ms.max))));
  }
  if (!rows.length) body.append(h('tr', {}, h('td', { colspan: 10, class: 'empty' }, 'No instances in this range.')));
}

// Steps with something waiting are the bottlenecks: a bar shows their share of the waiting.
function renderStepStats(rows) {
  const body = clear($('#analytics-steps tbody'));
  const maxWaiting = Math.max(1, ...rows.map((r) => (r.waiting && r.waiting.count) || 0));
  for (const r of rows) {
    const waiting = (r.waiting && r.waiting.count) || 0;
    const bar = h('span', { class: 'bar', 'aria-hidden': 'true' });
    bar.style.width = `${Math.round((waiting / maxWaiting) * 100)}%`;
    const oldest = r.waiting && r.waiting.oldest_since;
    body.append(h('tr', { 'data-template-id': r.template_id, 'data-step-index': r.step_index, class: waiting ? 'bottleneck' : '' },
      h('td', {}, templateName(r.template_id)),
      h('td', {}, `${r.step_index} · ${r.name}`),
      h('td', {}, r.step_type),
      h('td', { class: 'executions num' }, num(r.executions)),
      h('td', { class: 'completed num' }, num((r.by_status && r.by_status.completed) || 0)),
      h('td', { class: 'waiting num' }, h('span', { class: 'bar-wrap' }, bar), String(waiting)),
      h('td', { class: 'oldest' }, oldest ? [timeCell(oldest), h('div', { class: 'muted' }, relative(oldest))] : '—'),
      h('td', { class: 'avg num' }, fmtDuration(r.duration_ms && r.duration_ms.avg)),
      h('td', { class: 'max num' }, fmtDuration(r.duration_ms && r.duration_ms.max))));
  }
  if (!rows.length) body.append(h('tr', {}, h('td', { colspan: 9, class: 'empty' }, 'No step executions in this range.')));
}

/* ---------- wiring ---------- */

function wire() {
  $('#sign-in-form').addEventListener('submit', signIn);
  $('#sign-out').addEventListener('click', () => signOut('Signed out.'));
  $('#templates-filter').addEventListener('change', () => state.templates && renderTemplates(state.templates));
  $('#new-template').addEventListener('click', () => { location.hash = '#/builder'; });

  const form = $('#builder-form');
  form.addEventListener('input', onFieldEvent);
  form.addEventListener('change', onFieldEvent);
  form.addEventListener('click', onBuilderClick);
  $('#add-step').addEventListener('click', addStep);
  $('#save-template').addEventListener('click', guard(saveTemplate));
  $('#tpl-deactivate').addEventListener('click', guard(() => deactivate(state.builder.id)));
  $('#tpl-versions').addEventListener('change', pickVersion);
  $('#json-edit').addEventListener('click', () => setJsonEditing(true));
  $('#json-cancel').addEventListener('click', () => setJsonEditing(false));
  $('#json-apply').addEventListener('click', applyJson);

  $('#instances-filter').addEventListener('submit', filterInstances);
  $('#instances-prev').addEventListener('click', () => pageInstances(-1));
  $('#instances-next').addEventListener('click', () => pageInstances(1));
  $('#start-form').addEventListener('submit', guard(startInstance));
  $('#instances-export').addEventListener('click', guard(exportInstances));
  $('#instance-refresh').addEventListener('click', () => route());
  $('#cancel-instance').addEventListener('click', guard(cancelInstance));

  $('#pending-refresh').addEventListener('click', guard(() => showPending(false)));
  $('#pending-more').addEventListener('click', guard(() => showPending(true)));
  $('#analytics-filter').addEventListener('submit', (e) => { e.preventDefault(); guard(loadAnalytics)(); });

  window.addEventListener('hashchange', route);
  route();
}

wire();
