// The chat view: a conversation's history, the composer, the streamed answer with a stop button,
// the model picker and the session's settings (system prompt, temperature).

import { explain, explainStreamError, ApiError } from "./api.js";
import { h, replace, uid } from "./dom.js";
import { renderMarkdown } from "./markdown.js";

const THINKING = "Thinking…";
const ROLE_NAMES = { MESSAGE_ROLE_USER: "You", MESSAGE_ROLE_ASSISTANT: "Assistant", MESSAGE_ROLE_TOOL: "Tool" };

// Tool calls and tool results come from API clients that pass tools (the composer sends none):
// an answer's calls are shown as code under its text, a tool result as code labelled "Tool".
// A reasoning model's thinking is folded above its answer: a <details> whose summary says
// "Thinking…" while it streams, then how long it took ("Reasoning" for one loaded from history);
// its text is plain text, never markup.
function messageView(role, { status = "", error = "" } = {}) {
  const assistant = role === "MESSAGE_ROLE_ASSISTANT";
  const tool = role === "MESSAGE_ROLE_TOOL";
  const thoughtLabel = h("summary", { text: "Reasoning" });
  const thoughtText = h("p", { class: "plain msg-thought-text" });
  const thought = h("details", { class: "msg-thought", hidden: true }, thoughtLabel, thoughtText);
  const body = h("div", { class: "msg-body" });
  const calls = h("div", { class: "msg-calls" });
  const note = h("p", { class: "msg-note" });
  const kind = assistant ? "assistant" : tool ? "tool" : "user";
  const el = h("article", { class: `msg ${kind}`, "aria-label": ROLE_NAMES[role] || "Message" },
    h("h2", { class: tool ? "msg-role" : "sr-only", text: ROLE_NAMES[role] || "Message" }), thought, body, calls, note);
  const view = {
    el,
    body,
    text: "",
    set(text) {
      view.text = text;
      if (assistant) renderMarkdown(body, text);
      else if (tool) replace(body, h("pre", {}, h("code", { text })));
      else replace(body, h("p", { class: "plain", text }));
    },
    // The reasoning so far and what its summary says; hidden while there is none.
    think(text, label = "Reasoning") {
      thought.hidden = !text;
      thought.dataset.state = label === THINKING ? "thinking" : "done";
      if (thoughtText.textContent !== text) thoughtText.textContent = text;
      if (thoughtLabel.textContent !== label) thoughtLabel.textContent = label;
    },
    addCalls(list) {
      for (const call of list || []) {
        calls.append(h("pre", { class: "tool-call", title: call.id }, h("code", { text: `${call.name}(${call.arguments})` })));
      }
    },
    mark(kind, words) {
      el.dataset.status = kind;
      note.textContent = words || "";
    },
    say(words) {
      note.textContent = words || "";
    },
  };
  if (status === "MESSAGE_STATUS_INCOMPLETE") view.mark("incomplete", "Stopped before the end.");
  if (status === "MESSAGE_STATUS_ERROR") view.mark("error", error ? `Failed: ${error}` : "Failed.");
  return view;
}

export class ChatView {
  constructor(app, session) {
    this.app = app;
    this.api = app.api;
    this.session = session;
    this.controller = null;
    this.build();
  }

  build() {
    const s = this.session;
    const settingsId = uid("settings");
    this.title = h("h1", { id: "view-title", tabindex: "-1", text: s.title || "New chat" });
    this.modelPicker = h("select", { id: uid("model"), onchange: () => this.changeModel() },
      h("option", { value: "", text: "Server default" }));
    this.settingsButton = h("button", { type: "button", class: "secondary", "aria-expanded": "false", "aria-controls": settingsId,
      onclick: () => this.toggleSettings() }, "Settings");
    this.systemPrompt = h("textarea", { id: uid("system"), rows: "3", value: s.system_prompt || "",
      placeholder: "For example: You are a concise assistant." });
    const temperature = s.sampling?.temperature;
    this.temperature = h("input", { id: uid("temperature"), type: "number", min: "0", max: "2", step: "0.1", inputmode: "decimal",
      value: temperature === undefined || temperature === null ? "" : String(Math.round(temperature * 100) / 100),
      placeholder: "model default" });
    this.settingsStatus = h("p", { class: "form-status", role: "status" });
    this.settings = h("form", { id: settingsId, class: "settings", hidden: true, "aria-label": "Conversation settings",
      onsubmit: (e) => { e.preventDefault(); this.saveSettings(); } },
      h("label", { for: this.systemPrompt.id }, "System prompt"), this.systemPrompt,
      h("label", { for: this.temperature.id }, "Temperature ", h("span", { class: "hint", text: "(0 to 2; 0 always gives the same answer; empty uses the model's default)" })),
      this.temperature,
      h("div", { class: "row" }, h("button", { type: "submit" }, "Save settings"), this.settingsStatus));

    this.log = h("div", { class: "log", role: "log", "aria-live": "polite", "aria-label": "Conversation", tabindex: "0" });
    this.status = h("p", { class: "chat-status", role: "status", "aria-live": "polite" });
    this.prompt = h("textarea", { id: uid("prompt"), rows: "2", required: true, placeholder: "Ask anything…",
      "aria-describedby": "composer-hint", onkeydown: (e) => this.keydown(e) });
    this.send = h("button", { type: "submit", class: "send" }, "Send");
    this.stop = h("button", { type: "button", class: "stop danger", hidden: true, onclick: () => this.abort() }, "Stop");
    this.composer = h("form", { class: "composer", "aria-label": "Send a message", onsubmit: (e) => { e.preventDefault(); this.submit(); } },
      h("label", { for: this.prompt.id, class: "sr-only" }, "Message"), this.prompt,
      h("div", { class: "composer-actions" }, this.send, this.stop),
      h("p", { id: "composer-hint", class: "hint" }, "Enter sends, Shift+Enter adds a line."));

    this.el = h("section", { class: "chat", "aria-labelledby": "view-title" },
      h("header", { class: "chat-head" },
        h("a", { href: "#/", class: "back" }, h("span", { "aria-hidden": "true" }, "← "), "Conversations"),
        this.title,
        h("div", { class: "chat-tools" },
          h("label", { for: this.modelPicker.id, class: "inline-label" }, "Model"), this.modelPicker, this.settingsButton)),
      this.settings, this.log, this.status, this.composer);
    // Escape stops a generation wherever the focus is in the chat.
    this.el.addEventListener("keydown", (event) => {
      if (event.key === "Escape" && this.controller) this.abort();
    });
  }

  // The models and the history. Returns when the history is shown; a turn sent before then waits
  // for it (submit), or the history would replace the turn's messages in the log.
  load() {
    this.loadModels();
    this.loading = this.loadMessages();
    return this.loading;
  }

  async loadMessages() {
    try {
      const messages = await this.api.all(`/v1/sessions/${encodeURIComponent(this.session.id)}/messages`, "messages");
      replace(this.log);
      for (const m of messages) {
        const view = messageView(m.role, { status: m.status, error: m.error });
        view.set(m.content);
        view.think(m.reasoning || "");
        view.addCalls(m.tool_calls);
        this.log.append(view.el);
      }
      if (!messages.length) this.log.append(h("p", { class: "empty", text: "No messages yet. Say hello below." }));
      this.scroll(true);
    } catch (error) {
      this.app.showError(error);
    }
  }

  async loadModels() {
    try {
      // Embedding models cannot chat: the picker offers chat models only.
      const models = (await this.app.models()).filter((m) => (m.task || "chat") === "chat");
      const current = this.session.model || "";
      replace(this.modelPicker, h("option", { value: "", text: "Server default" }),
        models.map((m) => h("option", { value: m.id, text: m.state === "MODEL_STATE_READY" ? m.id : `${m.id} (${stateWord(m.state)})` })));
      if (current && !models.some((m) => m.id === current)) this.modelPicker.append(h("option", { value: current, text: `${current} (missing)` }));
      this.modelPicker.value = current;
    } catch (error) {
      this.app.showError(error);
    }
  }

  focus() {
    this.prompt.focus();
  }

  keydown(event) {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      this.composer.requestSubmit();
    }
  }

  scroll(force = false) {
    const nearBottom = this.log.scrollHeight - this.log.scrollTop - this.log.clientHeight < 80;
    if (force || nearBottom) this.log.scrollTop = this.log.scrollHeight;
  }

  toggleSettings() {
    const open = this.settings.hidden;
    this.settings.hidden = !open;
    this.settingsButton.setAttribute("aria-expanded", String(open));
    if (open) this.systemPrompt.focus();
  }

  async changeModel() {
    await this.update({ model: this.modelPicker.value }, `Model set to ${this.modelPicker.value || "the server default"}.`);
  }

  async saveSettings() {
    const raw = this.temperature.value.trim();
    const temperature = raw === "" ? null : Number(raw);
    if (temperature !== null && !(temperature >= 0 && temperature <= 2)) {
      this.settingsStatus.textContent = "Temperature must be a number from 0 to 2.";
      this.temperature.focus();
      return;
    }
    const sampling = { ...(this.session.sampling || {}) };
    if (temperature === null) delete sampling.temperature;
    else sampling.temperature = temperature;
    const ok = await this.update({ system_prompt: this.systemPrompt.value, sampling }, "Settings saved.");
    this.settingsStatus.textContent = ok ? "Saved." : "Not saved.";
  }

  async update(fields, words) {
    try {
      this.session = await this.api.updateSession(this.session.id, fields);
      this.app.sessionChanged(this.session);
      this.status.textContent = words;
      return true;
    } catch (error) {
      this.app.showError(error);
      return false;
    }
  }

  abort() {
    if (this.controller) this.controller.abort();
  }

  busy(on) {
    this.send.disabled = on;
    this.stop.hidden = !on;
    this.modelPicker.disabled = on;
    this.log.setAttribute("aria-busy", String(on));
  }

  async submit() {
    const content = this.prompt.value.trim();
    if (!content || this.controller || this.waiting) return;
    if (this.loading) {
      this.waiting = true;
      try {
        await this.loading;
      } finally {
        this.waiting = false;
      }
    }
    this.log.querySelector(".empty")?.remove();
    const mine = messageView("MESSAGE_ROLE_USER");
    mine.set(content);
    this.log.append(mine.el);
    this.prompt.value = "";
    this.scroll(true);

    const answer = messageView("MESSAGE_ROLE_ASSISTANT");
    answer.el.dataset.status = "streaming";
    answer.el.setAttribute("aria-busy", "true");
    this.log.append(answer.el);
    this.controller = new AbortController();
    this.busy(true);
    this.stop.focus();
    this.status.textContent = "Generating an answer…";

    let text = "";
    let reasoning = "";
    let thinkingSince = 0; // when the first reasoning arrived
    let thoughtMs = null; // how long it lasted, once the answer proper began (or the turn ended)
    let painted = 0;
    let paintedLabel = "";
    let frame = 0;
    const paint = () => {
      frame = 0;
      const label = thoughtMs === null ? THINKING : `Thought for ${Math.max(1, Math.round(thoughtMs / 1000))} s`;
      if (painted === text.length + reasoning.length && paintedLabel === label) return;
      painted = text.length + reasoning.length;
      paintedLabel = label;
      answer.think(reasoning, label);
      answer.set(text);
      this.scroll();
    };
    let ended = false;
    try {
      for await (const event of this.api.turn(this.session.id, { content }, this.controller.signal)) {
        answer.el.dataset.transport = this.api.transport;
        if (event.queued) {
          // The server is busy: say where this answer stands instead of a spinner.
          const { position, estimated_wait_ms: wait } = event.queued;
          const words = `Waiting in line: ${ordinal(position)}${wait >= 1000 ? `, about ${waitWords(wait)}` : ""}.`;
          answer.el.dataset.queuePosition = String(position);
          answer.say(words);
          this.status.textContent = words;
        } else if (event.delta) {
          if (event.delta.reasoning) {
            thinkingSince ||= performance.now();
            reasoning += event.delta.reasoning;
          }
          if (thinkingSince && thoughtMs === null && (event.delta.text || event.delta.tool_calls?.length)) {
            thoughtMs = performance.now() - thinkingSince;
          }
          text += event.delta.text || "";
          answer.addCalls(event.delta.tool_calls);
          // One render per frame however fast tokens come.
          if (!frame) frame = requestAnimationFrame(paint);
        } else if (event.start) {
          answer.el.dataset.messageId = event.start.assistant_message_id || "";
          if (answer.el.dataset.queuePosition) {
            answer.say("");
            this.status.textContent = "Generating an answer…";
          }
        } else if (event.done) {
          ended = true;
          const done = event.done;
          const usage = done.usage || {};
          const reason = {
            FINISH_REASON_LENGTH: "Stopped at the length limit. ",
            FINISH_REASON_TOOL_CALLS: "Waiting for the tools' results. ",
          }[done.finish_reason] || "";
          answer.mark("complete", `${reason}${usage.completion_tokens || 0} tokens${done.cached ? ", from the cache" : ""}.`);
          this.status.textContent = "Answer complete.";
        } else if (event.error) {
          ended = true;
          answer.mark("error", explainStreamError(event.error));
          this.status.textContent = "The answer failed.";
        }
      }
      if (!ended) {
        answer.mark("error", "The connection closed before the answer finished; the part received is shown.");
        this.status.textContent = "The answer was cut off.";
      }
    } catch (error) {
      if (error.name === "AbortError") {
        answer.mark("incomplete", "Stopped. The part received is kept.");
        this.status.textContent = "Stopped.";
      } else {
        answer.mark("error", explain(error));
        this.status.textContent = "The answer failed.";
        if (error instanceof ApiError && !text) {
          // Nothing was generated (e.g. 429 before the turn began): give the text back to retry.
          this.prompt.value = content;
        }
      }
    } finally {
      if (frame) cancelAnimationFrame(frame);
      if (thinkingSince && thoughtMs === null) thoughtMs = performance.now() - thinkingSince;
      painted = -1;
      paint();
      answer.el.removeAttribute("aria-busy");
      this.controller = null;
      this.busy(false);
      this.prompt.focus();
      this.scroll();
    }
    if (!this.session.title) this.reloadSession();
  }

  // The service names an untitled conversation after its first message; show the new name.
  async reloadSession() {
    try {
      this.session = await this.api.get(`/v1/sessions/${encodeURIComponent(this.session.id)}`);
      this.title.textContent = this.session.title || "New chat";
      this.app.sessionChanged(this.session);
    } catch {
      // The list keeps the old name; nothing the user needs to act on.
    }
  }
}

export function ordinal(n) {
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : { 1: "st", 2: "nd", 3: "rd" }[n % 10] || "th";
  return `${n}${suffix}`;
}

function waitWords(ms) {
  const s = Math.round(ms / 1000);
  return s < 90 ? `${s} s` : `${Math.round(s / 60)} min`;
}

export function stateWord(state) {
  return {
    MODEL_STATE_AVAILABLE: "not loaded",
    MODEL_STATE_LOADING: "loading",
    MODEL_STATE_READY: "ready",
    MODEL_STATE_FAILED: "failed",
  }[state] || "unknown";
}
