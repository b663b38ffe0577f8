// Token use and budgets: a user's own (#/usage, from GET /v1/rate-limits/me and GET /v1/usage) and
// the team's per user and model (a panel of the admin page).

import { explain } from "./api.js";
import { h, number, replace, table, when } from "./dom.js";

const DAYS = 7;
const dayOf = (unix) => new Date(unix * 1000).toISOString().slice(0, 10);

function budgetRows(limits) {
  return (limits.budgets || []).map((b) => [
    b.period === "day" ? "Today (UTC)" : "This month (UTC)",
    b.limit ? number(b.limit) : "unlimited",
    number(b.used),
    b.limit ? number(b.remaining) : "—",
    when(b.reset_time),
  ]);
}

// The last DAYS days of `user_id`'s use ("" for one's own, "*" for everyone's), grouped as asked.
function recentUsage(api, groups, userId = "") {
  const start = Math.floor(Date.now() / 1000) - (DAYS - 1) * 86400;
  const query = new URLSearchParams({ start_time: String(start), limit: String(DAYS) });
  for (const g of groups) query.append("group_by", g);
  if (userId) query.set("user_id", userId);
  return api.get(`/v1/usage?${query}`);
}

export async function usageView(api) {
  const body = h("div", { "aria-live": "polite" });
  try {
    const [limits, usage] = await Promise.all([api.get("/v1/rate-limits/me"), recentUsage(api, ["model"])]);
    const rows = usage.data.flatMap((bucket) => bucket.results.map((r) => [
      dayOf(bucket.start_time), r.model || "", number(r.num_model_requests), number(r.input_tokens),
      number(r.output_tokens), number(r.num_cached_requests)])).reverse();
    replace(body,
      h("h2", {}, "Token budgets"),
      table("Your token budgets", ["Period", "Budget", "Used", "Left", "Resets"], budgetRows(limits)),
      h("h2", {}, `The last ${DAYS} days`),
      rows.length
        ? table("Your use per day and model", ["Day", "Model", "Requests", "Input tokens", "Output tokens", "Cached answers"], rows)
        : h("p", { class: "empty", text: "No use in these days." }));
  } catch (error) {
    replace(body, h("p", { class: "error-text", text: explain(error) }));
  }
  return h("section", { class: "page usage" },
    h("a", { href: "#/", class: "back" }, h("span", { "aria-hidden": "true" }, "← "), "Conversations"),
    h("h1", { id: "view-title", tabindex: "-1" }, "Usage"),
    h("p", { text: "Tokens your chats, API keys and programs used. Answers replayed from the cache count apart and use no budget." }),
    body);
}

// Fills `panel` with the team's use of the last DAYS days per user and model, for admins. Resolves
// to the users it lists (id → username), or null when the use could not be read.
export async function teamUsage(api, panel) {
  try {
    const usage = await recentUsage(api, ["user_id", "model"], "*");
    const totals = new Map();
    for (const r of usage.data.flatMap((bucket) => bucket.results)) {
      const key = `${r.user_id}\u0000${r.model}`;
      const sum = totals.get(key) || { user: r.user_id, model: r.model, requests: 0, input: 0, output: 0 };
      sum.requests += r.num_model_requests;
      sum.input += r.input_tokens;
      sum.output += r.output_tokens;
      totals.set(key, sum);
    }
    const names = new Map(await Promise.all([...new Set([...totals.values()].map((s) => s.user))].map(async (id) => {
      try {
        return [id, (await api.get(`/v1/users/${encodeURIComponent(id)}`)).username];
      } catch {
        return [id, id]; // a deleted account keeps its id
      }
    })));
    const rows = [...totals.values()].sort((a, b) => b.input + b.output - a.input - a.output)
      .map((s) => [names.get(s.user), s.model, number(s.requests), number(s.input), number(s.output)]);
    panel.removeAttribute("aria-busy");
    replace(panel, rows.length
      ? table(`Use per user and model, the last ${DAYS} days`, ["User", "Model", "Requests", "Input tokens", "Output tokens"], rows)
      : h("p", { class: "empty", text: `No use in the last ${DAYS} days.` }));
    return names;
  } catch (error) {
    panel.removeAttribute("aria-busy");
    replace(panel, h("p", { class: "error-text", text: explain(error) }));
    return null;
  }
}
