// Parley's web app: routing, sign-in, the list of conversations, API keys, usage and the admin page.
// Plain ES modules, no build step. Routes live in the hash: #/, #/s/<id>, #/keys, #/usage, #/admin, #/signin.

import { Api, explain } from "./api.js";
import { ChatView, stateWord } from "./chat.js";
import { h, icon, replace, when, uid } from "./dom.js";
import { teamLimits } from "./limits.js";
import { teamUsage, usageView } from "./usage.js";

class App {
  constructor() {
    this.api = new Api({ onSignedOut: () => this.signedOut() });
    this.main = document.getElementById("main");
    this.sidebar = document.getElementById("sidebar");
    this.nav = document.getElementById("account-nav");
    this.errorBox = document.getElementById("error");
    this.notice = document.getElementById("notice");
    this.sessions = [];
    this.modelList = null;
    this.chat = null;
    this.expired = false;
    this.routed = false;
    this.ticket = 0;
  }

  start() {
    window.addEventListener("hashchange", () => this.route());
    window.addEventListener("online", () => this.setNotice(""));
    window.addEventListener("offline", () => this.setNotice("You are offline. Answers need the network; what you see stays."));
    if (!navigator.onLine) this.setNotice("You are offline. Answers need the network; what you see stays.");
    document.querySelector(".skip-link").addEventListener("click", (e) => {
      e.preventDefault();
      (document.getElementById("view-title") || this.main).focus();
    });
    if ("serviceWorker" in navigator) {
      navigator.serviceWorker.register("/sw.js").catch(() => {
        // The app works without it; only offline start-up is lost.
      });
    }
    this.route();
  }

  setNotice(words) {
    this.notice.textContent = words;
    this.notice.hidden = !words;
  }

  showError(error) {
    if (error?.status === 401 && !this.api.auth) return; // signed out: the sign-in page says so
    const words = typeof error === "string" ? error : explain(error);
    replace(this.errorBox, h("p", { text: words }),
      h("button", { type: "button", class: "secondary small", onclick: () => this.clearError() }, "Dismiss"));
    this.errorBox.hidden = false;
  }

  clearError() {
    this.errorBox.hidden = true;
    replace(this.errorBox);
  }

  signedOut() {
    this.expired = true;
    this.sessions = [];
    replace(this.sidebar);
    if (location.hash === "#/signin") this.route();
    else location.hash = "#/signin";
  }

  async models(fresh = false) {
    if (!this.modelList || fresh) this.modelList = (await this.api.get("/v1/models")).data || [];
    return this.modelList;
  }

  // ---- routing -------------------------------------------------------------------------------

  async route() {
    const hash = location.hash.replace(/^#/, "") || "/";
    // A later navigation (or a sign-out) makes this one stale: it must not draw over the newer one.
    const ticket = ++this.ticket;
    const stale = () => ticket !== this.ticket;
    if (this.chat) {
      this.chat.abort();
      this.chat = null;
    }
    this.clearError();
    const signedIn = Boolean(this.api.auth);
    document.body.classList.toggle("signed-out", !signedIn);
    if (!signedIn) {
      this.renderNav();
      return this.show("signin", this.signInView());
    }
    this.expired = false;
    this.renderNav();
    let m;
    if (hash === "/" || hash === "/signin") {
      await this.refreshSessions();
      return stale() ? undefined : this.show("home", this.homeView());
    }
    if ((m = /^\/s\/([^/]+)$/.exec(hash))) return this.openSession(decodeURIComponent(m[1]), stale);
    if (hash === "/keys") {
      const view = await this.keysView();
      return stale() ? undefined : this.show("keys", view);
    }
    if (hash === "/usage") {
      const view = await usageView(this.api);
      return stale() ? undefined : this.show("usage", view);
    }
    if (hash === "/admin" && this.api.isAdmin) return this.show("admin", this.adminView());
    return this.show("missing", h("section", {}, h("h1", { id: "view-title", tabindex: "-1" }, "Page not found"),
      h("p", {}, h("a", { href: "#/" }, "Back to your conversations"))));
  }

  // Swaps the main view and moves focus to its heading, so a screen reader announces the new page.
  // Not on the first page of a visit: there the reader starts at the top anyway, and the skip link
  // must stay the first thing Tab reaches.
  show(name, view, { focus = true } = {}) {
    const first = !this.routed;
    this.routed = true;
    document.body.dataset.view = name;
    if (name !== "signin" && this.sidebar.childElementCount === 0) this.renderSidebar();
    replace(this.main, view);
    const title = this.main.querySelector("#view-title");
    document.title = title ? `${title.textContent} · Parley` : "Parley";
    if (focus && title && !first) title.focus({ preventScroll: true });
  }

  renderNav() {
    const user = this.api.user;
    if (!user) return replace(this.nav);
    replace(this.nav, h("ul", {},
      h("li", {}, h("a", { href: "#/usage" }, "Usage")),
      h("li", {}, h("a", { href: "#/keys" }, "API keys")),
      this.api.isAdmin ? h("li", {}, h("a", { href: "#/admin" }, "Admin")) : null,
      h("li", {}, h("button", { type: "button", class: "link", onclick: () => this.signOut(),
        "aria-label": `Sign out ${user.username}` }, "Sign out"))));
  }

  async signOut() {
    await this.api.signOut();
    this.sessions = [];
    replace(this.sidebar);
    location.hash = "#/signin";
    this.route();
  }

  // ---- sign in / register --------------------------------------------------------------------

  signInView() {
    let registering = false;
    const username = h("input", { id: "username", name: "username", autocomplete: "username", required: true, autocapitalize: "none", spellcheck: "false" });
    const password = h("input", { id: "password", name: "password", type: "password", autocomplete: "current-password", required: true });
    const status = h("p", { class: "form-status", role: "alert" });
    const submit = h("button", { type: "submit" }, "Sign in");
    const title = h("h1", { id: "view-title", tabindex: "-1" }, "Sign in to Parley");
    const toggle = h("button", { type: "button", class: "link" }, "Create an account instead");
    const hint = h("p", { class: "hint", id: "password-hint", hidden: true },
      "Use a long passphrase: 10 characters or more, mixing kinds of characters, not containing your username.");
    password.setAttribute("aria-describedby", "password-hint");
    toggle.addEventListener("click", () => {
      registering = !registering;
      title.textContent = registering ? "Create a Parley account" : "Sign in to Parley";
      submit.textContent = registering ? "Create account" : "Sign in";
      toggle.textContent = registering ? "I already have an account" : "Create an account instead";
      password.autocomplete = registering ? "new-password" : "current-password";
      hint.hidden = !registering;
      status.textContent = "";
      username.focus();
    });
    const form = h("form", { class: "card signin", "aria-labelledby": "view-title" },
      title,
      this.expired ? h("p", { class: "hint", text: "Your sign-in expired. Please sign in again." }) : null,
      h("label", { for: "username" }, "Username"), username,
      h("label", { for: "password" }, "Password"), password, hint,
      status,
      h("div", { class: "row" }, submit, toggle));
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      submit.disabled = true;
      status.textContent = "";
      try {
        await this.api.signIn(username.value.trim(), password.value, registering);
        password.value = "";
        replace(this.sidebar);
        if (location.hash === "#/" || !location.hash) this.route();
        else location.hash = "#/";
      } catch (error) {
        status.textContent = signInError(error, registering);
        password.focus();
      } finally {
        submit.disabled = false;
      }
    });
    return h("section", { class: "centered" }, form);
  }

  // ---- conversations -------------------------------------------------------------------------

  async refreshSessions() {
    try {
      this.sessions = await this.api.all("/v1/sessions", "sessions");
    } catch (error) {
      this.showError(error);
    }
    this.renderSidebar();
  }

  sessionChanged(session) {
    const i = this.sessions.findIndex((s) => s.id === session.id);
    if (i >= 0) this.sessions[i] = session;
    else this.sessions.unshift(session);
    this.renderSidebar();
  }

  renderSidebar() {
    if (!this.api.auth) return replace(this.sidebar);
    const current = /^#\/s\/([^/]+)$/.exec(location.hash)?.[1];
    const list = h("ul", { class: "sessions" }, this.sessions.map((s) => this.sessionItem(s, s.id === decodeURIComponent(current || ""))));
    replace(this.sidebar,
      h("h2", { class: "sidebar-title" }, "Conversations"),
      h("button", { type: "button", class: "new-chat", onclick: () => this.createSession() }, "New chat"),
      this.sessions.length ? list : h("p", { class: "empty", text: "No conversations yet." }));
  }

  sessionItem(session, active) {
    const name = session.title || "New chat";
    const li = h("li", { class: active ? "active" : "", dataset: { sessionId: session.id } });
    const normal = () => replace(li,
      h("a", { href: `#/s/${encodeURIComponent(session.id)}`, class: "session-link", "aria-current": active ? "page" : null, text: name }),
      h("div", { class: "item-actions" },
        h("button", { type: "button", class: "icon", "aria-label": `Rename ${name}`, title: "Rename", onclick: () => renaming() }, icon("pencil")),
        h("button", { type: "button", class: "icon", "aria-label": `Delete ${name}`, title: "Delete", onclick: () => confirming() }, icon("trash"))));
    const renaming = () => {
      const input = h("input", { value: session.title, "aria-label": "New name", maxlength: "200" });
      const form = h("form", { class: "rename", onsubmit: async (e) => {
        e.preventDefault();
        try {
          const updated = await this.api.updateSession(session.id, { title: input.value.trim() });
          this.sessionChanged(updated);
          if (this.chat?.session.id === session.id) {
            this.chat.session = updated;
            this.chat.title.textContent = updated.title || "New chat";
          }
          this.sidebar.querySelector(`[data-session-id="${CSS.escape(session.id)}"] .session-link`)?.focus();
        } catch (error) {
          this.showError(error);
        }
      } }, input,
      h("button", { type: "submit", class: "small" }, "Save"),
      h("button", { type: "button", class: "small secondary", onclick: () => { normal(); li.querySelector("button").focus(); } }, "Cancel"));
      input.addEventListener("keydown", (e) => {
        if (e.key === "Escape") {
          normal();
          li.querySelector("button").focus();
        }
      });
      replace(li, form);
      input.focus();
      input.select();
    };
    const confirming = () => {
      const cancel = h("button", { type: "button", class: "small secondary", onclick: () => { normal(); li.querySelector(".icon:last-child").focus(); } }, "Keep");
      replace(li, h("p", { class: "confirm", text: `Delete “${name}” and its messages?` }),
        h("div", { class: "row" },
          h("button", { type: "button", class: "small danger", onclick: () => this.deleteSession(session) }, "Delete"), cancel));
      cancel.focus();
    };
    normal();
    return li;
  }

  async createSession() {
    try {
      const session = await this.api.request("POST", "/v1/sessions", { title: "" });
      this.sessionChanged(session);
      location.hash = `#/s/${encodeURIComponent(session.id)}`;
    } catch (error) {
      this.showError(error);
    }
  }

  async deleteSession(session) {
    try {
      await this.api.request("DELETE", `/v1/sessions/${encodeURIComponent(session.id)}`);
      this.sessions = this.sessions.filter((s) => s.id !== session.id);
      this.renderSidebar();
      this.setStatus(`Deleted “${session.title || "New chat"}”.`);
      if (this.chat?.session.id === session.id || location.hash === `#/s/${encodeURIComponent(session.id)}`) location.hash = "#/";
      else this.sidebar.querySelector(".new-chat").focus();
    } catch (error) {
      this.showError(error);
    }
  }

  setStatus(words) {
    const live = document.getElementById("live-status");
    live.textContent = "";
    // A fresh text node after a tick, so the same words twice are announced twice.
    setTimeout(() => { live.textContent = words; }, 50);
  }

  homeView() {
    return h("section", { class: "home" },
      h("h1", { id: "view-title", tabindex: "-1" }, "Your conversations"),
      h("p", {}, this.sessions.length
        ? "Pick a conversation, or start a new one."
        : "Start your first conversation: the bundled model answers right away, on this machine."),
      h("button", { type: "button", onclick: () => this.createSession() }, "New chat"));
  }

  async openSession(id, stale = () => false) {
    if (!this.sessions.length) await this.refreshSessions();
    let session = this.sessions.find((s) => s.id === id);
    try {
      if (!session) session = await this.api.get(`/v1/sessions/${encodeURIComponent(id)}`);
    } catch (error) {
      if (stale()) return;
      this.show("missing", h("section", {}, h("h1", { id: "view-title", tabindex: "-1" }, "Conversation not available"),
        h("p", { text: explain(error) }), h("p", {}, h("a", { href: "#/" }, "Back to your conversations"))));
      return;
    }
    if (stale()) return;
    this.renderSidebar();
    const chat = new ChatView(this, session);
    this.chat = chat;
    this.show("chat", chat.el, { focus: false });
    await chat.load();
    if (this.chat === chat) chat.focus();
  }

  // ---- API keys ------------------------------------------------------------------------------

  async keysView() {
    const list = h("div", { class: "keys" });
    const secretBox = h("div", { class: "secret", hidden: true, role: "region", "aria-label": "New API key" });
    const name = h("input", { id: "key-name", required: true, maxlength: "100", placeholder: "laptop" });
    const days = h("input", { id: "key-days", type: "number", min: "1", max: "3650", step: "1", inputmode: "numeric", placeholder: "never" });
    const weight = h("input", { id: "key-weight", type: "number", min: "0.01", max: "1000", step: "any", inputmode: "decimal", placeholder: "1" });
    const refresh = async () => {
      try {
        const keys = await this.api.all("/v1/api-keys", "api_keys");
        if (!keys.length) return replace(list, h("p", { class: "empty", text: "No API keys yet." }));
        replace(list, h("table", {},
          h("caption", { class: "sr-only" }, "Your API keys"),
          h("thead", {}, h("tr", {}, ["Name", "Starts with", "Weight", "Created", "Last used", "Expires", ""].map((t) => h("th", { scope: "col", text: t })))),
          h("tbody", {}, keys.map((k) => {
            const row = h("tr", {},
              h("td", { text: k.name }), h("td", {}, h("code", { text: `${k.prefix}…` })), h("td", { text: String(k.share_weight ?? 1) }),
              h("td", { text: when(k.create_time) }), h("td", { text: when(k.last_used_time) || "never" }),
              h("td", { text: when(k.expire_time) || "never" }));
            const cell = h("td");
            const revoke = h("button", { type: "button", class: "small danger", "aria-label": `Revoke ${k.name}`, onclick: () => {
              replace(cell, h("button", { type: "button", class: "small danger", "aria-label": `Confirm revoking ${k.name}`, onclick: async () => {
                try {
                  await this.api.request("DELETE", `/v1/api-keys/${encodeURIComponent(k.id)}`);
                  this.setStatus(`Revoked ${k.name}.`);
                  await refresh();
                  name.focus();
                } catch (error) {
                  this.showError(error);
                }
              } }, "Revoke now"), " ", h("button", { type: "button", class: "small secondary", onclick: () => { replace(cell, revoke); revoke.focus(); } }, "Keep"));
              cell.querySelector("button").focus();
            } }, "Revoke");
            cell.append(revoke);
            row.append(cell);
            return row;
          }))));
      } catch (error) {
        this.showError(error);
      }
    };
    const form = h("form", { class: "card", "aria-labelledby": "new-key-title", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const body = { name: name.value.trim() };
        if (days.value) body.ttl_seconds = String(Number(days.value) * 86400);
        if (weight.value) body.share_weight = Number(weight.value);
        const created = await this.api.request("POST", "/v1/api-keys", body);
        const secret = h("code", { class: "secret-value", text: created.secret, tabindex: "0" });
        const copy = h("button", { type: "button", class: "small", onclick: async () => {
          try {
            await navigator.clipboard.writeText(created.secret);
            copy.textContent = "Copied";
          } catch {
            copy.textContent = "Select and copy it by hand";
          }
        } }, "Copy");
        replace(secretBox, h("h2", { text: `Key “${created.api_key.name}” created` }),
          h("p", { text: "Copy it now: this is the only time it is shown. Use it as a Bearer token or as the openai SDK's api_key." }),
          h("p", {}, secret, " ", copy));
        secretBox.hidden = false;
        name.value = "";
        days.value = "";
        weight.value = "";
        secret.focus();
        await refresh();
      } catch (error) {
        this.showError(error);
      }
    } },
    h("h2", { id: "new-key-title" }, "Create a key"),
    h("label", { for: "key-name" }, "Name"), name,
    h("label", { for: "key-days" }, "Expires after (days, empty for never)"), days,
    h("label", { for: "key-weight" }, "Weight among your keys when the server is busy (3: three requests start for each one of a weight-1 key; empty for 1)"), weight,
    h("div", { class: "row" }, h("button", { type: "submit" }, "Create key")));
    await refresh();
    return h("section", { class: "page" },
      h("a", { href: "#/", class: "back" }, h("span", { "aria-hidden": "true" }, "← "), "Conversations"),
      h("h1", { id: "view-title", tabindex: "-1" }, "API keys"),
      h("p", { text: "Keys let programs use Parley as you: the REST API, gRPC, or any OpenAI-compatible client." }),
      secretBox, form, h("h2", {}, "Your keys"), list);
  }

  // ---- admin ---------------------------------------------------------------------------------

  adminView() {
    const hardware = h("div", { class: "panel-body", "aria-busy": "true" }, "Loading…");
    const models = h("div", { class: "panel-body", "aria-busy": "true" }, "Loading…");
    const metrics = h("div", { class: "panel-body", "aria-busy": "true" }, "Loading…");
    const usage = h("div", { class: "panel-body", "aria-busy": "true" }, "Loading…");
    const limits = h("div", { class: "panel-body", "aria-busy": "true" }, "Loading…");
    teamUsage(this.api, usage).then((users) => teamLimits(this.api, limits, users));
    const section = (id, title, body, wide = false) => h("section", { class: `card panel${wide ? " wide" : ""}`, "aria-labelledby": id },
      h("h2", { id, text: title }), body);
    const facts = (pairs) => h("dl", { class: "facts" }, pairs.map(([k, v]) => [h("dt", { text: k }), h("dd", { text: String(v) })]));
    const failed = (el, error) => {
      el.removeAttribute("aria-busy");
      replace(el, h("p", { class: "error-text", text: explain(error) }));
    };

    this.api.get("/v1/admin/hardware").then((hw) => {
      const d = hw.detected || {};
      const c = hw.chosen || {};
      hardware.removeAttribute("aria-busy");
      replace(hardware,
        facts([
          ["CPU", `${d.physical_cores} physical cores, ${d.logical_cpus} logical`],
          ["Memory", `${mib(d.available_memory_mib)} free of ${mib(d.total_memory_mib)}`],
          ["GPUs", (d.cuda_devices || []).map((g) => `${g.name} (${mib(g.free_memory_mib)} free of ${mib(g.total_memory_mib)})`).join("; ") || "none"],
          ["Apple MPS", d.mps_available ? "yes" : "no"],
          ["Engine", `${c.engine} on ${c.device}`],
          ["Threads", c.threads],
          ["Context", `${c.context_length} tokens × ${c.parallel_slots} slots`],
        ]),
        (c.reasons || []).length ? h("details", {}, h("summary", {}, "Why these settings"), h("ul", {}, c.reasons.map((r) => h("li", { text: r })))) : null);
    }, (error) => failed(hardware, error));

    const renderModels = async () => {
      try {
        const list = await this.models(true);
        models.removeAttribute("aria-busy");
        replace(models, h("table", {},
          h("caption", { class: "sr-only" }, "Models"),
          h("thead", {}, h("tr", {}, ["Model", "Task", "State", "Engine", "Chat format", "Memory", ""].map((t) => h("th", { scope: "col", text: t })))),
          h("tbody", {}, list.map((m) => {
            const loaded = m.state === "MODEL_STATE_READY";
            const action = h("button", { type: "button", class: "small", "aria-label": `${loaded ? "Unload" : "Load"} ${m.id}`, onclick: async () => {
              action.disabled = true;
              action.textContent = loaded ? "Unloading…" : "Loading…";
              try {
                await this.api.request("POST", `/v1/models/${encodeURIComponent(m.id)}:${loaded ? "unload" : "load"}`, {});
                this.setStatus(`${m.id} ${loaded ? "unloaded" : "loaded"}.`);
              } catch (error) {
                this.showError(error);
              }
              await renderModels();
              models.querySelector(`button[aria-label$="${CSS.escape(m.id)}"]`)?.focus();
            } }, loaded ? "Unload" : "Load");
            return h("tr", { dataset: { modelId: m.id } },
              h("td", {}, h("code", { text: m.id })),
              h("td", { text: m.task || "chat" }),
              h("td", { class: "model-state", text: m.state === "MODEL_STATE_FAILED" && m.error ? `failed: ${m.error}` : stateWord(m.state) }),
              h("td", { text: m.engine }), h("td", { text: m.chat_format || "" }),
              h("td", { text: m.memory_mib ? mib(m.memory_mib) : "" }), h("td", {}, action));
          }))));
      } catch (error) {
        failed(models, error);
      }
    };
    renderModels();

    this.api.get("/v1/admin/metrics").then((m) => {
      metrics.removeAttribute("aria-busy");
      const ms = (v) => `${Number(v || 0).toFixed(0)} ms`;
      replace(metrics, facts([
        ["Requests", m.requests_total ?? 0],
        ["Time to first token", `${ms(m.time_to_first_token_p50_ms)} median, ${ms(m.time_to_first_token_p95_ms)} p95`],
        ["Decode speed", `${Number(m.tokens_per_second || 0).toFixed(1)} tokens/s`],
        ["Cache hits", `${Math.round(Number(m.cache_hit_ratio || 0) * 100)} %`],
        ["Loaded models", (m.loaded_models || []).map((x) => `${x.id} (${mib(x.memory_mib)})`).join(", ") || "none"],
      ]));
    }, (error) => failed(metrics, error));

    return h("section", { class: "page admin" },
      h("a", { href: "#/", class: "back" }, h("span", { "aria-hidden": "true" }, "← "), "Conversations"),
      h("h1", { id: "view-title", tabindex: "-1" }, "Administration"),
      h("div", { class: "panels" },
        section(uid("hw"), "Hardware", hardware),
        section(uid("models"), "Models", models, true),
        section(uid("metrics"), "Metrics", metrics),
        section(uid("usage"), "Usage", usage, true),
        section(uid("limits"), "Limits", limits, true)));
  }
}

// At the door a 401 means a wrong password, not an expired sign-in, and a 429 means too many tries.
function signInError(error, registering) {
  if (error?.status === 401) return "Wrong username or password.";
  if (error?.status === 429) {
    const wait = error.retryAfter ? ` Try again in ${error.retryAfter} seconds.` : " Wait a while and try again.";
    return `Too many attempts.${wait}`;
  }
  if (error?.status === 403 && registering) return `You cannot register here${error.message ? ` (${error.message})` : ""}. Ask an administrator for an account.`;
  return explain(error);
}

function mib(n) {
  const value = Number(n || 0);
  return value >= 1024 ? `${(value / 1024).toFixed(1)} GiB` : `${value} MiB`;
}

const app = new App();
window.parley = app; // for the browser tests and the curious
app.start();
