// A small Markdown renderer for model answers that builds DOM nodes directly. Text only ever becomes
// text nodes, so HTML in an answer (<img onerror=…>, <script>) shows as the characters it is. Links
// keep only http(s) and mailto targets. Supported: paragraphs, line breaks, headings, fenced and
// indented code, block quotes, bullet and numbered lists, rules, `code`, **bold**, *italic*,
// ~~strike~~ and [links](https://…). An unterminated fence (mid-stream) renders as code so far.

import { h } from "./dom.js";

const SAFE_URL = /^(https?:|mailto:)/i;

const INLINE = [
  { kind: "code", re: /`([^`\n]+)`/ },
  { kind: "link", re: /\[([^\]\n]+)\]\(([^)\s]+)\)/ },
  // Underscores only around whole words: snake_case and __dunder__ names stay as they are.
  { kind: "strong", re: /\*\*(?=\S)([\s\S]*?\S)\*\*|(?<!\w)__(?=\S)([\s\S]*?\S)__(?!\w)/ },
  { kind: "em", re: /\*(?=\S)([^*]*?\S)\*|(?<!\w)_(?=\S)([^_]*?\S)_(?!\w)/ },
  { kind: "del", re: /~~(?=\S)([\s\S]*?\S)~~/ },
  { kind: "url", re: /\bhttps?:\/\/[^\s<>()]+[^\s<>().,;:!?'"]/ },
];

// Inline spans of one paragraph or item, appended to `parent`.
function inline(parent, text) {
  while (text) {
    let best = null;
    for (const rule of INLINE) {
      const match = rule.re.exec(text);
      if (match && (best === null || match.index < best.match.index)) best = { rule, match };
    }
    if (!best) {
      parent.append(text);
      return;
    }
    const { rule, match } = best;
    if (match.index > 0) parent.append(text.slice(0, match.index));
    const inner = match[1] ?? match[2] ?? "";
    if (rule.kind === "code") {
      parent.append(h("code", { text: inner }));
    } else if (rule.kind === "link" || rule.kind === "url") {
      const href = rule.kind === "link" ? match[2] : match[0];
      const label = rule.kind === "link" ? match[1] : match[0];
      if (SAFE_URL.test(href)) {
        const a = h("a", { href, rel: "noopener noreferrer nofollow", target: "_blank" });
        // A bare URL is its own label, and would match itself again: it stays text.
        if (rule.kind === "url") a.append(label);
        else inline(a, label);
        parent.append(a);
      } else {
        parent.append(match[0]);
      }
    } else {
      const el = h(rule.kind);
      inline(el, inner);
      parent.append(el);
    }
    text = text.slice(match.index + match[0].length);
  }
}

// Lines joined by single newlines keep their breaks, as people expect in chat.
function lines(parent, text) {
  text.split("\n").forEach((line, i) => {
    if (i > 0) parent.append(h("br"));
    inline(parent, line);
  });
  return parent;
}

const FENCE = /^ {0,3}(```+|~~~+)\s*([\w+#.-]*)\s*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const BULLET = /^ {0,3}[-*+]\s+(.*)$/;
const NUMBERED = /^ {0,3}(\d{1,9})[.)]\s+(.*)$/;
const INDENTED = /^( {4}|\t)(.*)$/;

function blockStart(line) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || BULLET.test(line) || NUMBERED.test(line);
}

function blocks(parent, source) {
  const all = source.replace(/\r\n?/g, "\n").split("\n");
  let i = 0;
  while (i < all.length) {
    const line = all[i];
    let m;
    if (!line.trim()) {
      i += 1;
    } else if ((m = FENCE.exec(line))) {
      const fence = m[1];
      const body = [];
      i += 1;
      while (i < all.length && !all[i].trim().startsWith(fence)) body.push(all[i++]);
      i += 1; // the closing fence, if any
      const code = h("code", { text: body.join("\n") });
      if (m[2]) code.dataset.lang = m[2];
      parent.append(h("pre", { tabindex: "0" }, code));
    } else if ((m = HEADING.exec(line))) {
      // Answer headings sit below the page's own: h3 at most.
      const level = Math.min(6, m[1].length + 2);
      parent.append(inlineInto(h(`h${level}`), m[2]));
      i += 1;
    } else if (RULE.test(line)) {
      parent.append(h("hr"));
      i += 1;
    } else if (QUOTE.test(line)) {
      const body = [];
      while (i < all.length && (m = QUOTE.exec(all[i]))) {
        body.push(m[1]);
        i += 1;
      }
      parent.append(blocks(h("blockquote"), body.join("\n")));
    } else if (BULLET.test(line) || NUMBERED.test(line)) {
      const ordered = NUMBERED.test(line);
      const re = ordered ? NUMBERED : BULLET;
      const list = h(ordered ? "ol" : "ul");
      if (ordered) {
        const start = Number(NUMBERED.exec(line)[1]);
        if (start !== 1) list.setAttribute("start", String(start));
      }
      const items = [];
      while (i < all.length) {
        const current = all[i];
        if ((m = re.exec(current))) {
          items.push([ordered ? m[2] : m[1]]);
        } else if (current.trim() && /^\s+/.test(current) && items.length) {
          items[items.length - 1].push(current.trim()); // a continued or nested line stays in its item
        } else {
          break;
        }
        i += 1;
      }
      for (const item of items) list.append(lines(h("li"), item.join("\n")));
      parent.append(list);
    } else if (INDENTED.test(line)) {
      const body = [];
      while (i < all.length && (INDENTED.test(all[i]) || !all[i].trim())) {
        body.push(all[i].replace(/^( {4}|\t)/, ""));
        i += 1;
      }
      while (body.length && !body[body.length - 1].trim()) body.pop();
      parent.append(h("pre", { tabindex: "0" }, h("code", { text: body.join("\n") })));
    } else {
      const body = [];
      while (i < all.length && all[i].trim() && (body.length === 0 || !blockStart(all[i]))) body.push(all[i++]);
      parent.append(lines(h("p"), body.join("\n")));
    }
  }
  return parent;
}

function inlineInto(el, text) {
  inline(el, text);
  return el;
}

// Replaces the content of `target` with the rendering of `source`.
export function renderMarkdown(target, source) {
  const fragment = document.createDocumentFragment();
  blocks(fragment, source || "");
  target.replaceChildren(fragment);
  return target;
}
