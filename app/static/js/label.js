/*
 * The labeling page (templates/label/task.html).
 *
 * Loads tasks from the JSON API, lets the annotator rank the completions by drag and drop
 * (SortableJS) or by keyboard alone, and submits without reloading the page. Every piece of
 * task data is written with textContent / setAttribute, never parsed as HTML, so a completion
 * containing markup or script only ever shows as text.
 *
 * Ranking model: `ranked` is the ranked completions, best first, each {id, tie} where tie
 * means "tied with the entry above"; the groups sent to the server are derived from it.
 * Keyboard: letters append, "=" ties the next letter with the previous one, Backspace undoes,
 * Enter submits (a single completion left unranked goes last), S skips, ? shows the help.
 * With K = 2 the same model sits behind a pairwise choice (A better / B better / tie / both bad).
 */
(function () {
  "use strict";

  const byId = (id) => document.getElementById(id);
  const config = JSON.parse(byId("label-config").textContent);
  const catalog = JSON.parse(byId("i18n-catalog").textContent);
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const pairwise = config.k === 2;
  const allowTies = !!config.allowTies;

  const el = {
    task: byId("task"),
    loading: byId("loading"),
    done: byId("done"),
    waiting: byId("waiting"),
    doneHeading: byId("done-heading"),
    checkAgain: byId("check-again"),
    live: byId("live"),
    alert: byId("alert"),
    promptHeading: byId("prompt-heading"),
    promptBody: byId("prompt-body"),
    cards: byId("cards"),
    cardTemplate: byId("card-template"),
    ranked: byId("ranked"),
    pool: byId("pool"),
    clearRanking: byId("clear-ranking"),
    strength: byId("strength"),
    rationale: byId("rationale"),
    submit: byId("submit-button"),
    skip: byId("skip-button"),
    help: byId("help-button"),
    skipDialog: byId("skip-dialog"),
    skipForm: byId("skip-form"),
    skipReason: byId("skip-reason"),
    skipCancel: byId("skip-cancel"),
    helpDialog: byId("help-dialog"),
    myCount: byId("my-count"),
  };

  /* ------------------------------------------------------------------ i18n, announcements */

  function t(message, vars) {
    let text = Object.prototype.hasOwnProperty.call(catalog, message) ? catalog[message] : message;
    if (vars) {
      text = text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
    }
    return text;
  }

  let announceTimer = null;
  function announce(text) {
    // Cleared first so that the same message twice in a row is announced twice.
    el.live.textContent = "";
    clearTimeout(announceTimer);
    announceTimer = setTimeout(() => {
      el.live.textContent = text;
    }, 30);
  }

  function showAlert(text, items) {
    el.alert.replaceChildren();
    const p = document.createElement("p");
    p.textContent = text;
    el.alert.appendChild(p);
    if (items && items.length) {
      const ul = document.createElement("ul");
      for (const item of items) {
        const li = document.createElement("li");
        li.textContent = item;
        ul.appendChild(li);
      }
      el.alert.appendChild(ul);
    }
  }

  function clearAlert() {
    el.alert.replaceChildren();
  }

  /* ------------------------------------------------------------------ API */

  function api(method, url, body) {
    const options = {
      method: method,
      credentials: "same-origin",
      headers: { Accept: "application/json", "X-CSRF-Token": csrfToken },
    };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.body = JSON.stringify(body);
    }
    return fetch(url, options).then((res) => {
      if (res.status === 401) {
        sessionEnded();
        throw new Error("unauthenticated");
      }
      const type = res.headers.get("content-type") || "";
      const parsed =
        res.status !== 204 && type.indexOf("json") !== -1
          ? res.json().catch(() => null)
          : Promise.resolve(null);
      return parsed.then((data) => ({ status: res.status, data: data }));
    });
  }

  function sessionEnded() {
    showAlert(t("Your session has ended; log in again."));
    const here = location.pathname + location.search;
    setTimeout(() => location.assign("/login?next=" + encodeURIComponent(here)), 800);
  }

  function fetchNext(exclude) {
    const query = exclude.map((id) => "exclude=" + encodeURIComponent(id)).join("&");
    return api("GET", config.urls.next + (query ? "?" + query : "")).then((res) => {
      if (res.status === 200 && res.data) return res.data;
      if (res.status === 204) return null;
      const err = new Error("next task: HTTP " + res.status);
      err.tooManyTasks = res.status === 429; // the per-user cap on open tasks
      throw err;
    });
  }

  function fetchFailed(err) {
    showAlert(
      err && err.tooManyTasks
        ? t("You hold too many open tasks (in other tabs or projects): submit or skip one of them, then check again.")
        : t("The server could not be reached. Your answers are kept: try again.")
    );
  }

  function leaseUrl(leaseId, action) {
    return config.urls.leases + encodeURIComponent(leaseId) + "/" + action;
  }

  /* ------------------------------------------------------------------ state */

  let state = null; // the task on screen
  let prefetched = null; // {promise, task} of the next one, fetched in the background

  function newState(task) {
    const byLabel = {};
    const byIdMap = {};
    for (const c of task.completions) {
      byLabel[c.label] = c;
      byIdMap[c.id] = c;
    }
    return {
      task: task,
      byLabel: byLabel,
      byId: byIdMap,
      ranked: [],
      pendingTie: false,
      choice: null, // pairwise: "A" | "B" | "tie" | "bad"
      strength: null,
      likert: {},
      flags: {},
      visibleMs: 0,
      visibleSince: document.visibilityState === "visible" ? performance.now() : null,
      busy: false,
    };
  }

  function elapsedMs() {
    const running = state.visibleSince !== null ? performance.now() - state.visibleSince : 0;
    return Math.max(0, Math.round(state.visibleMs + running));
  }

  function isRanked(id) {
    return state.ranked.some((e) => e.id === id);
  }

  function unranked() {
    return state.task.completions.filter((c) => !isRanked(c.id));
  }

  function groups() {
    const out = [];
    for (const entry of state.ranked) {
      if (entry.tie && out.length) out[out.length - 1].push(entry.id);
      else out.push([entry.id]);
    }
    return out;
  }

  function rankOf(id) {
    const gs = groups();
    for (let i = 0; i < gs.length; i++) {
      if (gs[i].indexOf(id) !== -1) return { rank: i + 1, tied: gs[i].length > 1 };
    }
    return null;
  }

  function normalise() {
    state.ranked.forEach((entry, i) => {
      if (i === 0 || !allowTies) entry.tie = false;
    });
    if (!state.ranked.length || !unranked().length) state.pendingTie = false;
  }

  function labelOf(id) {
    return state.byId[id].label;
  }

  /* ------------------------------------------------------------------ ranking actions */

  function rankNext(id, tie) {
    const previous = state.ranked.length ? state.ranked[state.ranked.length - 1] : null;
    state.ranked.push({ id: id, tie: !!(tie && previous && allowTies) });
    state.pendingTie = false;
    normalise();
    render();
    const where = rankOf(id);
    if (tie && previous && allowTies) {
      announce(t("{label} tied with {other}.", { label: labelOf(id), other: labelOf(previous.id) }));
    } else {
      announce(t("{label} ranked {rank}.", { label: labelOf(id), rank: where.rank }));
    }
  }

  function unrank(id) {
    const i = state.ranked.findIndex((e) => e.id === id);
    if (i === -1) return;
    const removed = state.ranked.splice(i, 1)[0];
    // The entry below a removed group head becomes the head (it stays with its own group).
    if (!removed.tie && state.ranked[i] && state.ranked[i].tie) state.ranked[i].tie = false;
    normalise();
    render();
    announce(t("Removed {label} from the ranking.", { label: labelOf(id) }));
  }

  function toggleTie(id) {
    const entry = state.ranked.find((e) => e.id === id);
    if (!entry || !allowTies) return;
    entry.tie = !entry.tie;
    normalise();
    render();
    const i = state.ranked.indexOf(entry);
    if (entry.tie) {
      announce(t("{label} tied with {other}.", { label: labelOf(id), other: labelOf(state.ranked[i - 1].id) }));
    } else {
      announce(t("{label} ranked {rank}.", { label: labelOf(id), rank: rankOf(id).rank }));
    }
  }

  function pressLetter(label) {
    const c = state.byLabel[label];
    if (pairwise) {
      if (state.choice === null) setChoice(label, true);
      else announce(choiceText(state.choice)); // typing best-to-worst: the second letter is the worse
      return;
    }
    if (isRanked(c.id)) {
      announce(t("{label} is already ranked.", { label: label }));
      return;
    }
    rankNext(c.id, state.pendingTie);
  }

  function pressTie() {
    if (!allowTies) {
      announce(t("Ties are not allowed in this project."));
      return;
    }
    if (pairwise) {
      setChoice("tie", true);
      return;
    }
    if (!state.ranked.length) {
      announce(t("Type a letter first; = ties the next letter with it."));
      return;
    }
    if (!unranked().length) return;
    state.pendingTie = true;
    render();
    announce(t("Next letter ties with {label}.", { label: labelOf(state.ranked[state.ranked.length - 1].id) }));
  }

  function undo() {
    if (pairwise) {
      if (state.choice !== null) {
        setChoice(null, false);
        announce(t("Ranking cleared."));
      }
      return;
    }
    if (state.pendingTie) {
      state.pendingTie = false;
      render();
      announce(t("Tie cancelled."));
      return;
    }
    if (state.ranked.length) unrank(state.ranked[state.ranked.length - 1].id);
  }

  function clearRanking() {
    state.ranked = [];
    state.pendingTie = false;
    render();
    announce(t("Ranking cleared."));
  }

  /* pairwise ------------------------------------------------------------------------------ */

  function choiceText(choice) {
    if (choice === "A" || choice === "B") return t("{label} is better.", { label: choice });
    if (choice === "tie") return t("Both are equally good.");
    if (choice === "bad") return t("Both are bad.");
    return t("Ranking cleared.");
  }

  function setChoice(choice, speak) {
    const a = state.byLabel.A.id;
    const b = state.byLabel.B.id;
    state.choice = choice;
    if (choice === "A") state.ranked = [{ id: a, tie: false }, { id: b, tie: false }];
    else if (choice === "B") state.ranked = [{ id: b, tie: false }, { id: a, tie: false }];
    else if (choice === "tie" || choice === "bad") state.ranked = [{ id: a, tie: false }, { id: b, tie: true }];
    else state.ranked = [];
    if (choice !== "A" && choice !== "B") state.strength = null;
    render();
    if (speak) announce(choiceText(choice));
  }

  function setStrength(value, speak) {
    if (state.choice !== "A" && state.choice !== "B") return;
    state.strength = value;
    render();
    if (speak) announce(value === 2 ? t("Strength: much better.") : t("Strength: slightly better."));
  }

  /* ------------------------------------------------------------------ rendering */

  function appendText(container, text) {
    // Prose keeps its whitespace (pre-wrap); ``` fenced blocks become scrollable code blocks.
    const lines = String(text).split("\n");
    let prose = [];
    let code = null;
    let lang = "";
    const flushProse = () => {
      if (prose.length && prose.join("").trim() !== "") {
        const p = document.createElement("p");
        p.className = "text-block";
        p.textContent = prose.join("\n");
        container.appendChild(p);
      }
      prose = [];
    };
    const flushCode = () => {
      if (lang) {
        const caption = document.createElement("span");
        caption.className = "code-lang";
        caption.textContent = lang;
        container.appendChild(caption);
      }
      const pre = document.createElement("pre");
      pre.className = "code-block";
      pre.setAttribute("tabindex", "0"); // scrollable regions must be reachable by keyboard
      pre.setAttribute("aria-label", lang ? t("Code") + ": " + lang : t("Code"));
      const codeEl = document.createElement("code");
      codeEl.textContent = code.join("\n");
      pre.appendChild(codeEl);
      container.appendChild(pre);
      code = null;
      lang = "";
    };
    for (const line of lines) {
      const fence = /^\s*```\s*([^`]*)$/.exec(line);
      if (fence && code === null) {
        flushProse();
        code = [];
        lang = fence[1].trim().slice(0, 40);
      } else if (fence && code !== null && fence[1].trim() === "") {
        flushCode();
      } else if (code !== null) {
        code.push(line);
      } else {
        prose.push(line);
      }
    }
    if (code !== null) flushCode();
    flushProse();
    if (!container.childNodes.length) {
      const p = document.createElement("p");
      p.className = "text-block";
      p.textContent = String(text);
      container.appendChild(p);
    }
  }

  const ROLE_NAMES = { user: "User", assistant: "Assistant", system: "System" };

  function renderPrompt(messages) {
    el.promptBody.replaceChildren();
    if (messages.length === 1 && messages[0].role === "user") {
      appendText(el.promptBody, messages[0].content);
      return;
    }
    for (const m of messages) {
      const block = document.createElement("div");
      block.className = "message " + (ROLE_NAMES[m.role] ? m.role : "user");
      const role = document.createElement("span");
      role.className = "role";
      role.textContent = t(ROLE_NAMES[m.role] || "User");
      block.appendChild(role);
      appendText(block, m.content);
      el.promptBody.appendChild(block);
    }
  }

  function renderCards() {
    el.cards.replaceChildren();
    for (const c of state.task.completions) {
      const card = el.cardTemplate.content.firstElementChild.cloneNode(true);
      const titleId = "card-title-" + c.label;
      card.id = "card-" + c.label;
      card.dataset.id = String(c.id);
      card.dataset.label = c.label;
      card.setAttribute("aria-labelledby", titleId);
      card.querySelector(".letter").textContent = c.label;
      const title = card.querySelector(".card-title");
      title.id = titleId;
      title.textContent = t("Completion {label}", { label: c.label });
      appendText(card.querySelector(".completion-text"), c.text);

      const likert = card.querySelector(".likert");
      if (likert) {
        const legend = likert.querySelector("legend");
        legend.id = "likert-legend-" + c.label;
        likert.setAttribute("aria-labelledby", titleId + " " + legend.id);
        for (const input of likert.querySelectorAll("input")) {
          input.name = "likert-" + c.id;
          input.addEventListener("change", () => {
            state.likert[String(c.id)] = Number(input.value);
          });
        }
      }
      const flags = card.querySelector(".flags");
      if (flags) {
        const count = flags.querySelector(".flag-count");
        for (const input of flags.querySelectorAll("input")) {
          input.name = "flags-" + c.id;
          input.addEventListener("change", () => {
            const chosen = Array.from(flags.querySelectorAll("input:checked")).map((i) => i.value);
            if (chosen.length) state.flags[String(c.id)] = chosen;
            else delete state.flags[String(c.id)];
            count.textContent = chosen.length ? "(" + chosen.length + ")" : "";
          });
        }
      }
      el.cards.appendChild(card);
    }
  }

  function snippet(text) {
    const flat = String(text).replace(/\s+/g, " ").trim();
    return flat.length > 90 ? flat.slice(0, 90) + "…" : flat;
  }

  function chip(c) {
    const li = document.createElement("li");
    li.className = "chip";
    li.dataset.id = String(c.id);
    const grip = document.createElement("span");
    grip.className = "grip";
    grip.setAttribute("aria-hidden", "true");
    grip.textContent = "⠿";
    const letter = document.createElement("span");
    letter.className = "letter";
    letter.textContent = c.label;
    const text = document.createElement("span");
    text.className = "snippet";
    text.textContent = snippet(c.text);
    li.append(grip, letter, text);
    return li;
  }

  function chipButton(className, text, label) {
    const button = document.createElement("button");
    button.type = "button";
    button.className = className;
    button.textContent = text;
    button.setAttribute("aria-label", label);
    button.title = label;
    return button;
  }

  function renderChips() {
    if (pairwise) return;
    const active = document.activeElement;
    let refocus = null;
    if (active && active.closest && active.closest(".chip") && el.task.contains(active)) {
      refocus = { id: active.closest(".chip").dataset.id, cls: active.className };
    }
    const gs = groups();
    const ranked = [];
    state.ranked.forEach((entry, i) => {
      const c = state.byId[entry.id];
      const where = rankOf(entry.id);
      const li = chip(c);
      const no = document.createElement("span");
      no.className = "rank-no";
      no.textContent = (entry.tie ? "=" : "") + where.rank;
      li.insertBefore(no, li.children[1]);
      if (entry.tie) li.classList.add("tied");
      if (allowTies && i > 0) {
        const tie = chipButton("tie-toggle", "=", t("Tie {label} with the completion above", { label: c.label }));
        tie.setAttribute("aria-pressed", entry.tie ? "true" : "false");
        tie.addEventListener("click", () => toggleTie(entry.id));
        li.appendChild(tie);
      }
      const remove = chipButton("remove", "×", t("Remove {label} from the ranking", { label: c.label }));
      remove.addEventListener("click", () => unrank(entry.id));
      li.appendChild(remove);
      ranked.push(li);
    });
    el.ranked.replaceChildren(...ranked);
    el.ranked.classList.toggle("pending-tie", state.pendingTie);
    el.ranked.dataset.groups = String(gs.length);

    const pool = unranked().map((c) => {
      const li = chip(c);
      const add = chipButton("add", "+", t("Rank {label} next", { label: c.label }));
      add.addEventListener("click", () => rankNext(c.id, false));
      li.appendChild(add);
      return li;
    });
    el.pool.replaceChildren(...pool);

    if (refocus) {
      const target =
        document.querySelector('.chip[data-id="' + refocus.id + '"] button.' + refocus.cls.split(" ")[0]) ||
        document.querySelector('.chip[data-id="' + refocus.id + '"] button');
      if (target) target.focus();
    }
  }

  function renderBadges() {
    for (const card of el.cards.children) {
      const id = Number(card.dataset.id);
      const where = rankOf(id);
      const badge = card.querySelector(".rank-badge");
      card.classList.toggle("is-ranked", !!where);
      card.classList.toggle("is-tied", !!(where && where.tied));
      if (!where) badge.textContent = t("Not ranked");
      else if (where.tied) badge.textContent = t("Rank {rank} (tie)", { rank: where.rank });
      else badge.textContent = t("Rank {rank}", { rank: where.rank });
    }
  }

  function renderPairwise() {
    if (!pairwise) return;
    for (const input of el.task.querySelectorAll('input[name="choice"]')) {
      input.checked = input.value === state.choice;
    }
    const strengthOn = state.choice === "A" || state.choice === "B";
    el.strength.disabled = !strengthOn;
    for (const input of el.strength.querySelectorAll('input[name="strength"]')) {
      input.checked = strengthOn && Number(input.value) === state.strength;
    }
  }

  function render() {
    renderChips();
    renderBadges();
    renderPairwise();
  }

  /* ------------------------------------------------------------------ task lifecycle */

  function showTask(task, message) {
    state = newState(task);
    el.task.dataset.leaseId = String(task.lease_id);
    renderPrompt(task.prompt.messages || []);
    renderCards();
    el.rationale.value = "";
    el.submit.disabled = false;
    el.skip.disabled = false;
    render();
    el.loading.hidden = true;
    el.done.hidden = true;
    el.waiting.hidden = true;
    el.task.hidden = false;
    el.promptHeading.focus();
    const labels = task.completions.map((c) => c.label);
    const loaded = t("Task loaded: {k} completions, labelled {first} to {last}.", {
      k: labels.length,
      first: labels[0],
      last: labels[labels.length - 1],
    });
    announce(message ? message + " " + loaded : loaded);
    prefetch();
  }

  // While the project's prompts still wait for generated completions, "nothing left" only
  // means "not yet": wait, asking again every WAIT_POLL_MS, and show the first task that is
  // ready (the demo's first tasks appear this way while its worker is generating).
  const WAIT_POLL_MS = 5000;
  let waitTimer = null;

  function waitForTasks(message) {
    state = null;
    el.loading.hidden = true;
    el.task.hidden = true;
    el.done.hidden = true;
    el.waiting.hidden = false;
    if (waitTimer === null) {
      byId("waiting-heading").focus();
      const waiting = t("Tasks are still being generated: waiting for the next one.");
      announce(message ? message + " " + waiting : waiting);
    }
    clearTimeout(waitTimer);
    waitTimer = setTimeout(() => {
      if (document.visibilityState !== "visible") return waitForTasks();
      fetchNext([]).then(
        (task) => {
          if (!task) return waitForTasks();
          waitTimer = null;
          el.waiting.hidden = true;
          showTask(task);
        },
        () => waitForTasks()
      );
    }, WAIT_POLL_MS);
  }

  function showDone(message) {
    if (config.pendingGeneration > 0) return waitForTasks(message);
    state = null;
    el.loading.hidden = true;
    el.task.hidden = true;
    el.done.hidden = false;
    el.doneHeading.focus();
    const nothing = t("Nothing left to label in this project for you. Thank you!");
    announce(message ? message + " " + nothing : nothing);
  }

  function prefetch() {
    if (!state) return;
    const entry = { task: undefined, promise: null };
    entry.promise = fetchNext([state.task.lease_id]).then(
      (task) => {
        entry.task = task;
        return task;
      },
      () => null
    );
    prefetched = entry;
  }

  function expired(task) {
    return Date.parse(task.expires_at) <= Date.now() + 2000;
  }

  function takeNext() {
    const entry = prefetched;
    prefetched = null;
    return (entry ? entry.promise : Promise.resolve(null)).then((task) =>
      task && !expired(task) ? task : fetchNext([])
    );
  }

  function advance(message, asAlert) {
    state = null;
    el.task.hidden = true;
    el.loading.hidden = false;
    if (asAlert) showAlert(message);
    takeNext().then(
      (task) => (task ? showTask(task, asAlert ? "" : message) : showDone(asAlert ? "" : message)),
      (err) => {
        if (err && err.message === "unauthenticated") return;
        el.loading.hidden = true;
        el.done.hidden = false;
        fetchFailed(err);
      }
    );
  }

  function bumpCount() {
    if (el.myCount) el.myCount.textContent = String(Number(el.myCount.textContent || 0) + 1);
  }

  function setBusy(busy) {
    state.busy = busy;
    el.submit.disabled = busy;
    el.skip.disabled = busy;
  }

  function validate() {
    if (pairwise) {
      if (state.choice === null) return t("Choose which completion is better before submitting.");
    } else {
      const left = unranked();
      if (left.length === 1 && state.ranked.length) {
        // The last one needs no letter: it goes last (tied when "=" was pressed before).
        state.ranked.push({ id: left[0].id, tie: state.pendingTie && allowTies });
        state.pendingTie = false;
        render();
      } else if (left.length) {
        return t("Rank every completion before submitting ({n} not ranked yet).", { n: left.length });
      }
    }
    if (config.requireRationale && !el.rationale.value.trim()) {
      return t("Write a rationale before submitting: this project requires one.");
    }
    return null;
  }

  function submit() {
    if (!state || state.busy) return;
    clearAlert();
    const problem = validate();
    if (problem) {
      showAlert(problem);
      if (config.requireRationale && !el.rationale.value.trim() && (pairwise ? state.choice : !unranked().length)) {
        el.rationale.focus();
      }
      return;
    }
    const ids = new Set(state.task.completions.map((c) => String(c.id)));
    const likert = {};
    if (config.likert) {
      for (const [id, score] of Object.entries(state.likert)) if (ids.has(id)) likert[id] = score;
    }
    const flags = {};
    for (const [id, list] of Object.entries(state.flags)) if (ids.has(id) && list.length) flags[id] = list;
    const body = {
      ranking: groups(),
      likert: likert,
      flags: flags,
      rationale: el.rationale.value,
      duration_ms: elapsedMs(),
      strength: pairwise && (state.choice === "A" || state.choice === "B") ? state.strength : null,
      both_bad: pairwise && state.choice === "bad",
    };
    const lease = state.task.lease_id;
    setBusy(true);
    announce(t("Submitting…"));
    api("POST", leaseUrl(lease, "submit"), body).then(
      (res) => {
        if (res.status === 201 || res.status === 200) {
          bumpCount();
          advance(t("Submitted. Next task shown."));
        } else if (res.status === 409 || res.status === 404) {
          advance(t("This task expired or was already submitted; here is the next one."), true);
        } else if (res.status === 403) {
          advance(t("You may not label this task."), true);
        } else if (res.status === 422 && res.data) {
          setBusy(false);
          const items = (res.data.errors || []).map((e) => (e.field ? e.field + ": " : "") + e.message);
          showAlert(t("The answer was not accepted:") + " " + (res.data.detail || ""), items);
        } else {
          setBusy(false);
          showAlert(t("The server could not be reached. Your answers are kept: try again."));
        }
      },
      (err) => {
        if (state) setBusy(false);
        if (!err || err.message !== "unauthenticated") {
          showAlert(t("The server could not be reached. Your answers are kept: try again."));
        }
      }
    );
  }

  function openSkip() {
    if (!state || state.busy) return;
    el.skipReason.value = "";
    el.skipDialog.showModal();
    el.skipReason.focus();
  }

  function skip(reason) {
    if (!state || state.busy) return;
    clearAlert();
    const lease = state.task.lease_id;
    setBusy(true);
    api("POST", leaseUrl(lease, "skip"), { reason: reason, duration_ms: elapsedMs() }).then(
      (res) => {
        if (res.status === 201 || res.status === 200) {
          bumpCount();
          advance(t("Skipped. Next task shown."));
        } else if (res.status === 409 || res.status === 404) {
          advance(t("This task expired or was already submitted; here is the next one."), true);
        } else if (res.status === 403) {
          advance(t("You may not label this task."), true);
        } else {
          setBusy(false);
          showAlert(t("The server could not be reached. Your answers are kept: try again."));
        }
      },
      (err) => {
        if (state) setBusy(false);
        if (!err || err.message !== "unauthenticated") {
          showAlert(t("The server could not be reached. Your answers are kept: try again."));
        }
      }
    );
  }

  /* heartbeat: keep the shown (and the prefetched) lease alive while the tab is visible ---- */

  function heartbeat() {
    if (document.visibilityState !== "visible") return;
    if (state && !state.busy) {
      const current = state;
      api("POST", leaseUrl(current.task.lease_id, "extend")).then(
        (res) => {
          if (state !== current || current.busy) return;
          if (res.status === 200 && res.data) current.task.expires_at = res.data.expires_at;
          else if (res.status === 409 || res.status === 404 || res.status === 403) {
            advance(t("This task expired or was already submitted; here is the next one."), true);
          }
        },
        () => {}
      );
    }
    const entry = prefetched;
    if (entry && entry.task) {
      api("POST", leaseUrl(entry.task.lease_id, "extend")).then(
        (res) => {
          if (res.status === 200 && res.data) entry.task.expires_at = res.data.expires_at;
          else if (prefetched === entry) {
            prefetched = null;
            prefetch();
          }
        },
        () => {}
      );
    }
  }

  /* ------------------------------------------------------------------ keyboard */

  const NON_TEXT_INPUTS = ["checkbox", "radio", "button", "submit", "reset", "range", "color", "file", "image"];

  function isTextField(node) {
    if (!node || node.nodeType !== 1) return false;
    if (node.isContentEditable) return true;
    const tag = node.tagName;
    if (tag === "TEXTAREA" || tag === "SELECT") return true;
    return tag === "INPUT" && NON_TEXT_INPUTS.indexOf((node.type || "").toLowerCase()) === -1;
  }

  function activatesOnEnter(node) {
    if (!node || node.nodeType !== 1) return false;
    const tag = node.tagName;
    return tag === "BUTTON" || tag === "A" || tag === "SUMMARY" || (tag === "INPUT" && /^(button|submit|reset)$/i.test(node.type));
  }

  function dialogOpen() {
    return el.skipDialog.open || el.helpDialog.open;
  }

  function toggleHelp() {
    if (el.helpDialog.open) el.helpDialog.close();
    else el.helpDialog.showModal();
  }

  function onKey(event) {
    if (event.defaultPrevented || event.isComposing || event.ctrlKey || event.metaKey || event.altKey) return;
    if (isTextField(event.target) || dialogOpen()) return;
    const key = event.key;
    if (key === "?") {
      event.preventDefault();
      toggleHelp();
      return;
    }
    if (!state || el.task.hidden) return;
    if (key === "Enter") {
      if (activatesOnEnter(event.target)) return; // the focused button does its own thing
      event.preventDefault();
      submit();
      return;
    }
    if (state.busy) return;
    if (key === "Backspace") {
      event.preventDefault();
      undo();
      return;
    }
    if (key === "=") {
      event.preventDefault();
      pressTie();
      return;
    }
    if (key.length !== 1) return;
    const upper = key.toUpperCase();
    if (upper === "S") {
      event.preventDefault();
      openSkip();
    } else if (pairwise && upper === "X") {
      event.preventDefault();
      setChoice("bad", true);
    } else if (pairwise && (key === "1" || key === "2")) {
      event.preventDefault();
      setStrength(Number(key), true);
    } else if (Object.prototype.hasOwnProperty.call(state.byLabel, upper)) {
      event.preventDefault();
      pressLetter(upper);
    } else if (/^[A-Z]$/.test(upper)) {
      announce(t("There is no completion {label}.", { label: upper }));
    }
  }

  /* ------------------------------------------------------------------ wiring */

  function syncFromDom(event) {
    // After a drag: the DOM order of the ranked list is the new order; tie flags stay with
    // their completions (a completion dropped into the first place cannot be tied).
    const ties = {};
    for (const entry of state.ranked) ties[entry.id] = entry.tie;
    state.ranked = Array.from(el.ranked.children)
      .filter((li) => li.dataset.id)
      .map((li) => ({ id: Number(li.dataset.id), tie: !!ties[Number(li.dataset.id)] }));
    state.pendingTie = false;
    normalise();
    render();
    const id = event && event.item ? Number(event.item.dataset.id) : null;
    if (id && state.byId[id]) {
      const where = rankOf(id);
      if (!where) announce(t("Removed {label} from the ranking.", { label: labelOf(id) }));
      else announce(t("{label} ranked {rank}.", { label: labelOf(id), rank: where.rank }));
    }
  }

  function setUpDragAndDrop() {
    if (pairwise || typeof window.Sortable === "undefined") return;
    const options = {
      group: "ranking",
      animation: 120,
      forceFallback: true, // pointer events: the same behaviour with mouse, touch and pen
      fallbackTolerance: 4,
      delayOnTouchOnly: true,
      delay: 120,
      filter: "button",
      preventOnFilter: false,
      ghostClass: "sortable-ghost",
      chosenClass: "sortable-chosen",
      dragClass: "sortable-drag",
      onEnd: (event) => {
        if (state && !state.busy) syncFromDom(event);
        else if (state) render();
      },
    };
    window.Sortable.create(el.ranked, options);
    window.Sortable.create(el.pool, Object.assign({}, options, { sort: false }));
  }

  function wire() {
    document.addEventListener("keydown", onKey);
    el.task.addEventListener("submit", (event) => {
      event.preventDefault();
      submit();
    });
    el.skip.addEventListener("click", openSkip);
    el.help.addEventListener("click", toggleHelp);
    el.helpDialog.addEventListener("keydown", (event) => {
      if (event.key === "?") {
        event.preventDefault();
        el.helpDialog.close();
      }
    });
    el.skipForm.addEventListener("submit", (event) => {
      event.preventDefault();
      const reason = el.skipReason.value;
      el.skipDialog.close();
      skip(reason);
    });
    el.skipCancel.addEventListener("click", () => el.skipDialog.close());
    if (el.clearRanking) el.clearRanking.addEventListener("click", () => state && clearRanking());
    if (pairwise) {
      for (const input of el.task.querySelectorAll('input[name="choice"]')) {
        input.addEventListener("change", () => state && setChoice(input.value, false));
      }
      for (const input of el.task.querySelectorAll('input[name="strength"]')) {
        input.addEventListener("change", () => state && setStrength(Number(input.value), false));
      }
    }
    el.checkAgain.addEventListener("click", () => {
      clearAlert();
      announce(t("Checking for new tasks…"));
      fetchNext([]).then(
        (task) => (task ? showTask(task) : showDone()),
        (err) => {
          if (!err || err.message !== "unauthenticated") fetchFailed(err);
        }
      );
    });
    document.addEventListener("visibilitychange", () => {
      if (!state) return;
      if (document.visibilityState === "visible") {
        if (state.visibleSince === null) state.visibleSince = performance.now();
        heartbeat();
      } else if (state.visibleSince !== null) {
        state.visibleMs += performance.now() - state.visibleSince;
        state.visibleSince = null;
      }
    });
    setInterval(heartbeat, Math.max(10, Math.floor(config.leaseSeconds / 3)) * 1000);
    setUpDragAndDrop();
  }

  wire();
  fetchNext([]).then(
    (task) => (task ? showTask(task) : showDone()),
    (err) => {
      if (err && err.message === "unauthenticated") return;
      el.loading.hidden = true;
      el.done.hidden = false;
      fetchFailed(err);
    }
  );
})();
