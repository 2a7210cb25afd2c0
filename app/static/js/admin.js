/*
 * The admin page (templates/admin/home.html).
 *
 * While a listed generation job is queued or running, polls the jobs API every `pollMs`
 * (one request per project with such jobs, plus one per job that list left out) and updates
 * the job rows in place: status, progress bar, counts, worker, times, message. Polling stops
 * when no job is left in progress and pauses while the tab is hidden. A job finishing is
 * announced in the page's live region. The Cancel buttons call the JSON API (the form posts
 * to /admin/jobs/{id}/cancel without JavaScript). Everything is written with textContent.
 */
(function () {
  "use strict";

  const byId = (id) => document.getElementById(id);
  const configEl = byId("admin-config");
  if (!configEl) return;
  const config = JSON.parse(configEl.textContent);
  const catalog = JSON.parse(byId("i18n-catalog").textContent);
  const csrfMeta = document.querySelector('meta[name="csrf-token"]');
  const csrfToken = csrfMeta ? csrfMeta.getAttribute("content") : "";
  const live = byId("live");
  const alertBox = byId("alert");
  const UNFINISHED = ["queued", "running"];

  const rows = new Map(); // job id (string) → <tr>
  for (const row of document.querySelectorAll("tr[data-job-id]")) {
    rows.set(row.dataset.jobId, row);
  }

  /* ------------------------------------------------------------------ i18n, messages */

  function t(message, vars) {
    let text = Object.prototype.hasOwnProperty.call(catalog, message) ? catalog[message] : message;
    if (vars) {
      text = text.replace(/\{(\w+)\}/g, (m, name) => (name in vars ? String(vars[name]) : m));
    }
    return text;
  }

  function statusName(status) {
    switch (status) {
      case "queued":
        return t("Queued");
      case "running":
        return t("Running");
      case "succeeded":
        return t("Succeeded");
      case "failed":
        return t("Failed");
      case "cancelled":
        return t("Cancelled");
      default:
        return status;
    }
  }

  function finishedMessage(job) {
    if (job.status === "succeeded") return t("Job {id} succeeded.", { id: job.id });
    if (job.status === "failed") return t("Job {id} failed.", { id: job.id });
    return t("Job {id} was cancelled.", { id: job.id });
  }

  let announceTimer = null;
  function announce(messages) {
    if (!messages.length) return;
    // Cleared first so that the same message twice in a row is announced twice.
    live.textContent = "";
    clearTimeout(announceTimer);
    announceTimer = setTimeout(() => {
      live.textContent = messages.join(" ");
    }, 30);
  }

  function showAlert(text) {
    const p = document.createElement("p");
    p.textContent = text;
    alertBox.replaceChildren(p);
  }

  function clearAlert() {
    alertBox.replaceChildren();
  }

  /* ------------------------------------------------------------------ API */

  function url(template, vars) {
    return template.replace(/\{(\w+)\}/g, (m, name) => encodeURIComponent(String(vars[name])));
  }

  class HttpError extends Error {
    constructor(status) {
      super("HTTP " + status);
      this.status = status;
    }
  }

  function api(method, target) {
    return fetch(target, {
      method: method,
      credentials: "same-origin",
      cache: "no-store",
      headers: { Accept: "application/json", "X-CSRF-Token": csrfToken },
    }).then((res) => {
      if (res.status === 401) {
        sessionEnded();
        throw new HttpError(401);
      }
      const type = res.headers.get("content-type") || "";
      const parsed =
        type.indexOf("json") !== -1 ? res.json().catch(() => null) : Promise.resolve(null);
      return parsed.then((data) => ({ status: res.status, data: data }));
    });
  }

  let stopped = false;

  function sessionEnded() {
    stopped = true;
    showAlert(t("Your session has ended; log in again."));
    const here = location.pathname + location.search;
    setTimeout(() => location.assign("/login?next=" + encodeURIComponent(here)), 800);
  }

  function forbidden() {
    stopped = true;
    showAlert(t("Only administrators can follow and cancel jobs."));
  }

  /* ------------------------------------------------------------------ rendering */

  function field(root, name) {
    return root.querySelector('[data-field="' + name + '"]');
  }

  function setField(root, name, text) {
    const el = field(root, name);
    if (el && el.textContent !== text) el.textContent = text;
  }

  function utcTime(iso) {
    if (!iso) return "";
    const d = new Date(iso);
    if (isNaN(d.getTime())) return "";
    const pad = (n) => String(n).padStart(2, "0");
    return (
      d.getUTCFullYear() +
      "-" +
      pad(d.getUTCMonth() + 1) +
      "-" +
      pad(d.getUTCDate()) +
      " " +
      pad(d.getUTCHours()) +
      ":" +
      pad(d.getUTCMinutes()) +
      ":" +
      pad(d.getUTCSeconds())
    );
  }

  function setTime(row, name, iso) {
    const el = field(row, name);
    if (!el) return;
    if (iso) el.setAttribute("datetime", iso);
    else el.removeAttribute("datetime");
    const text = utcTime(iso) || "—";
    if (el.textContent !== text) el.textContent = text;
  }

  function addToCell(row, name, delta) {
    const el = row && field(row, name);
    if (!el || !delta) return;
    const now = parseInt(el.textContent, 10);
    if (!isNaN(now)) el.textContent = String(Math.max(0, now + delta));
  }

  function projectRow(slug) {
    for (const row of document.querySelectorAll("tr[data-project-slug]:not([data-job-id])")) {
      if (row.dataset.projectSlug === slug) return row;
    }
    return null;
  }

  /** Show ``job`` in its row; returns the announcement when it has just finished. */
  function update(row, job) {
    const was = row.dataset.status;
    const unfinished = UNFINISHED.indexOf(job.status) !== -1;
    row.dataset.status = job.status;

    const status = field(row, "status");
    status.className = "status status-" + job.status;
    setField(row, "status", statusName(job.status));
    field(row, "cancelling").hidden = !(job.status === "running" && job.cancel_requested);

    const bar = row.querySelector("progress");
    bar.max = Math.max(job.total, 1);
    bar.value = Math.min(job.done, job.total);
    setField(row, "progress", t("{done} / {total} prompts", { done: job.done, total: job.total }));

    const before = parseInt(row.dataset.completions, 10) || 0;
    const delta = job.completions_created - before;
    row.dataset.completions = String(job.completions_created);
    addToCell(projectRow(row.dataset.projectSlug), "completion_count", delta);

    setField(row, "completions_created", String(job.completions_created));
    setField(row, "duplicates_dropped", String(job.duplicates_dropped));
    setField(row, "errors", String((job.errors || []).length));
    setField(row, "worker", job.worker || "—");
    setTime(row, "started_at", job.started_at);
    setTime(row, "finished_at", job.finished_at);
    setField(row, "message", job.message || "");

    const form = row.querySelector("form.cancel-form");
    if (form) form.hidden = !unfinished || !!job.cancel_requested;

    const noWorker = byId("no-worker");
    if (noWorker && !document.querySelector('tr[data-job-id][data-status="queued"]')) {
      noWorker.hidden = true; // nothing waits for a worker any more
    }

    const wasUnfinished = UNFINISHED.indexOf(was) !== -1;
    return wasUnfinished && !unfinished ? finishedMessage(job) : null;
  }

  /** The project's prompts still waiting for generation, from its (newest) jobs. */
  function updatePending(slug, jobs) {
    const row = projectRow(slug);
    const cell = row && field(row, "pending_generation");
    if (!cell) return;
    let pending = 0;
    for (const job of jobs) {
      if (UNFINISHED.indexOf(job.status) !== -1) pending += Math.max(job.total - job.done, 0);
    }
    cell.textContent = String(pending);
  }

  /* ------------------------------------------------------------------ polling */

  let timer = null;
  let polling = false;

  function unfinishedRows() {
    return Array.from(rows.values()).filter((r) => UNFINISHED.indexOf(r.dataset.status) !== -1);
  }

  function schedule() {
    clearTimeout(timer);
    timer = null;
    if (stopped || polling || document.visibilityState !== "visible") return;
    if (!unfinishedRows().length) return;
    timer = setTimeout(poll, config.pollMs);
  }

  function getOk(target) {
    return api("GET", target).then((res) => {
      if (res.status === 403) forbidden();
      if (res.status !== 200 || !res.data) throw new HttpError(res.status);
      return res.data;
    });
  }

  function isNotFound(e) {
    return e instanceof HttpError && e.status === 404;
  }

  /** A job (or its project) deleted meanwhile: no longer followed. */
  function forget(row) {
    row.dataset.status = "";
    const form = row.querySelector("form.cancel-form");
    if (form) form.hidden = true;
  }

  async function poll() {
    timer = null;
    const active = unfinishedRows();
    if (stopped || polling || !active.length) return;
    polling = true;
    const messages = [];
    const show = (row, job) => {
      const message = update(row, job);
      if (message) messages.push(message);
    };
    try {
      const seen = new Set();
      const slugs = Array.from(new Set(active.map((r) => r.dataset.projectSlug)));
      for (const slug of slugs) {
        let jobs;
        try {
          jobs = await getOk(url(config.urls.projectJobs, { slug: slug }));
        } catch (e) {
          if (!isNotFound(e)) throw e;
          continue; // the project is gone: its jobs answer 404 below
        }
        for (const job of jobs) {
          const row = rows.get(String(job.id));
          if (!row) continue;
          seen.add(String(job.id));
          show(row, job);
        }
        updatePending(slug, jobs);
      }
      for (const row of active) {
        if (seen.has(row.dataset.jobId)) continue;
        try {
          show(row, await getOk(url(config.urls.job, { id: row.dataset.jobId })));
        } catch (e) {
          if (!isNotFound(e)) throw e;
          forget(row);
        }
      }
      clearAlert();
    } catch (e) {
      if (!stopped) {
        showAlert(t("The server could not be reached; progress updates resume when it can be."));
      }
    } finally {
      polling = false;
      announce(messages);
      schedule();
    }
  }

  document.addEventListener("visibilitychange", () => {
    if (document.visibilityState === "visible") {
      if (!timer && !polling) poll();
    } else {
      clearTimeout(timer);
      timer = null;
    }
  });

  /* ------------------------------------------------------------------ cancel */

  document.addEventListener("submit", (event) => {
    const form = event.target.closest ? event.target.closest("form.cancel-form") : null;
    if (!form) return;
    event.preventDefault();
    const row = form.closest("tr[data-job-id]");
    const id = row.dataset.jobId;
    const button = form.querySelector("button");
    button.disabled = true;
    api("POST", url(config.urls.cancel, { id: id }))
      .then((res) => {
        if (res.status === 200 && res.data) {
          clearAlert();
          const message = update(row, res.data);
          row.querySelector("th").focus();
          announce([
            message ||
              t("Cancellation requested for job {id}: it stops after its current batch.", {
                id: id,
              }),
          ]);
          schedule();
        } else if (res.status === 409) {
          announce([t("Job {id} had already finished.", { id: id })]);
          return getOk(url(config.urls.job, { id: id })).then((job) => {
            update(row, job);
            row.querySelector("th").focus();
          });
        } else if (res.status === 403) {
          forbidden();
        } else {
          showAlert(t("Job {id} could not be cancelled.", { id: id }));
        }
      })
      .catch((e) => {
        if (!(e instanceof HttpError && e.status === 401)) {
          showAlert(t("Job {id} could not be cancelled.", { id: id }));
        }
      })
      .finally(() => {
        button.disabled = false;
      });
  });

  schedule();
})();
