// Each user's fair-share weight and token budgets, for the admin page: a table of the users in the
// team's usage (GET /v1/rate-limits/{id} each; there is no list of all users) and a form that
// changes one user's at a time (PATCH /v1/rate-limits/{id}).

import { explain } from "./api.js";
import { h, number, replace, table, uid } from "./dom.js";

// What the form edits; `none` is what an absent field means (weight 1, budget unlimited).
const FIELDS = [
  { key: "share_weight", label: "Share weight", none: 1, attrs: { min: "0.01", max: "1000", step: "any", inputmode: "decimal" } },
  { key: "tokens_per_day", label: "Tokens per day (UTC)", none: 0, attrs: { min: "0", step: "1", inputmode: "numeric" } },
  { key: "tokens_per_month", label: "Tokens per month (UTC)", none: 0, attrs: { min: "0", step: "1", inputmode: "numeric" } },
];
// The PATCH that returns all three to the configured defaults (see RateLimit in cache.proto).
const DEFAULTS = { share_weight: 0, tokens_per_day: -1, tokens_per_month: -1 };

const valueOf = (limits, field) => Number(limits[field.key] ?? field.none);
const budget = (n) => (n ? number(n) : "unlimited");

// Fills `panel` with the limits of `users` (id → username, from teamUsage; null when unknown).
export async function teamLimits(api, panel, users) {
  panel.removeAttribute("aria-busy");
  if (!users) return replace(panel, h("p", { class: "error-text", text: "The users come from the usage above, which could not be read." }));
  if (!users.size) return replace(panel, h("p", { class: "empty", text: "No one used Parley in these days; their limits show here once they do." }));
  const ids = [...users.keys()];
  let all;
  try {
    all = new Map(await Promise.all(ids.map(async (id) => [id, await api.get(`/v1/rate-limits/${encodeURIComponent(id)}`)])));
  } catch (error) {
    return replace(panel, h("p", { class: "error-text", text: explain(error) }));
  }
  const list = h("div");
  const editor = h("div");
  const changeLabel = (id) => `Change the limits of ${users.get(id)}`;
  const render = () => replace(list, table("Share weight and token budgets per user", ["User", "Share weight", "Tokens a day", "Tokens a month", ""],
    ids.map((id) => {
      const limits = all.get(id);
      const change = h("button", { type: "button", class: "small secondary", "aria-label": changeLabel(id),
        onclick: () => edit(id) }, "Change");
      return [users.get(id), String(valueOf(limits, FIELDS[0])), budget(valueOf(limits, FIELDS[1])), budget(valueOf(limits, FIELDS[2])), change];
    })));
  const edit = (id) => {
    replace(editor, limitsForm(api, id, users.get(id), all.get(id), (saved) => {
      all.set(id, saved);
      render();
    }, () => {
      replace(editor);
      list.querySelector(`button[aria-label="${CSS.escape(changeLabel(id))}"]`)?.focus();
    }));
    editor.querySelector("input").focus();
  };
  render();
  replace(panel, list, editor);
}

function limitsForm(api, id, name, limits, saved, close) {
  const titleId = uid("limits-title");
  const hintId = uid("limits-hint");
  const inputs = FIELDS.map((f) => h("input", { id: uid(f.key), name: f.key, type: "number", ...f.attrs,
    value: String(valueOf(limits, f)), "aria-describedby": hintId }));
  const status = h("p", { class: "form-status", "aria-live": "polite" });
  const say = (words, failed = false) => {
    status.classList.toggle("error-text", failed);
    status.textContent = words;
  };
  const send = async (body) => {
    try {
      limits = await api.request("PATCH", `/v1/rate-limits/${encodeURIComponent(id)}`, body);
      FIELDS.forEach((f, i) => { inputs[i].value = String(valueOf(limits, f)); });
      saved(limits);
      say(`Saved: ${name} has weight ${valueOf(limits, FIELDS[0])}, ${budget(valueOf(limits, FIELDS[1]))} tokens a day and ${budget(valueOf(limits, FIELDS[2]))} a month.`);
    } catch (error) {
      say(explain(error), true);
    }
  };
  // Only what the admin changed is sent: an unchanged default must stay a default, not become an
  // override that a later change of the server's configuration would no longer reach.
  const submit = (event) => {
    event.preventDefault();
    const body = {};
    for (const [i, f] of FIELDS.entries()) {
      if (inputs[i].validity.badInput) return say(`${f.label} must be a number.`, true);
      if (inputs[i].value !== "" && Number(inputs[i].value) !== valueOf(limits, f)) body[f.key] = Number(inputs[i].value);
    }
    return Object.keys(body).length ? send(body) : say("Nothing changed.");
  };
  // novalidate: the server checks the values and says what is wrong (one place for the rules).
  return h("form", { class: "limits-form", novalidate: true, "aria-labelledby": titleId, onsubmit: submit },
    h("h3", { id: titleId, text: `Limits of ${name}` }),
    FIELDS.map((f, i) => [h("label", { for: inputs[i].id }, f.label), inputs[i]]),
    h("p", { class: "hint", id: hintId, text: "Weight 2 gets twice an equal share of the engines while others wait. A budget of 0 is unlimited." }),
    status,
    h("div", { class: "row" },
      h("button", { type: "submit" }, "Save"),
      h("button", { type: "button", class: "secondary", onclick: () => send(DEFAULTS) }, "Back to the defaults"),
      h("button", { type: "button", class: "secondary", onclick: close }, "Close")));
}
