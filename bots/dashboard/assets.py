"""The dashboard's one stylesheet and one script, served from memory (no build step, no
package data). The script only enhances: every page works without it."""

CSS = """
:root { --fg: #1d2330; --muted: #5b6478; --line: #d9dde6; --accent: #2f6fd6; --ok: #1f8a4c; --bg: #f6f7fa; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; color: var(--fg); background: var(--bg); }
header { display: flex; align-items: center; gap: 1.5rem; padding: .6rem 1.5rem; background: #1d2330; color: #fff; }
header .brand { font-size: 1.1rem; }
header nav a { color: #cfd6e6; text-decoration: none; margin-right: 1rem; }
header nav a.active, header nav a:hover { color: #fff; border-bottom: 2px solid var(--accent); }
header .logout { margin-left: auto; }
main { padding: 1rem 1.5rem 3rem; max-width: 1300px; }
h1 { font-size: 1.4rem; margin: .4rem 0 1rem; }
h2 { font-size: 1.1rem; margin: 1.6rem 0 .6rem; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(230px, 1fr)); gap: .8rem; }
.card { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .7rem .9rem; }
.card .label { color: var(--muted); font-size: .8rem; text-transform: uppercase; letter-spacing: .03em; }
.card .value { font-size: 1.15rem; margin-top: .2rem; word-break: break-word; }
table { border-collapse: collapse; width: 100%; background: #fff; border: 1px solid var(--line); }
th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid var(--line); vertical-align: top; font-size: .9rem; }
th { background: #eef1f6; }
tr.active { background: #eaf6ee; }
tr.serving { background: #fff6e0; }
.badge { display: inline-block; background: var(--ok); color: #fff; border-radius: 4px; padding: 0 .35rem; font-size: .75rem; }
tr.serving .badge { background: #b7791f; }
img.thumb { width: 140px; border: 1px solid var(--line); }
img.chart { max-width: 100%; height: auto; background: #fff; border: 1px solid var(--line); }
button { font: inherit; padding: .3rem .8rem; border-radius: 5px; border: 1px solid var(--accent); background: var(--accent); color: #fff; cursor: pointer; }
button[disabled] { opacity: .5; cursor: default; }
header button { background: transparent; border-color: #cfd6e6; }
form.inline { display: inline; }
.flash { background: #e8f0fd; border: 1px solid #bcd0f5; padding: .5rem .8rem; border-radius: 6px; }
.flash.error { background: #fdecea; border-color: #f5c2bd; }
.note { color: var(--muted); }
#progress { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: .4rem 1rem; margin: 1rem 0; }
#progress progress { width: 320px; vertical-align: middle; }
.events { color: var(--muted); font-size: .85rem; max-height: 16rem; overflow: auto; }
.outcome strong { color: var(--ok); }
td.text { white-space: pre-wrap; max-width: 40rem; }
body.login main { max-width: 420px; margin: 12vh auto; background: #fff; border: 1px solid var(--line); border-radius: 10px; padding: 1.5rem; }
body.login label { display: block; margin: 1rem 0; }
body.login input { width: 100%; padding: .4rem; font: inherit; margin-top: .3rem; }
.hint { color: var(--muted); font-size: .85rem; }
"""

JS = """
'use strict';
(function () {
  const csrf = (document.querySelector('meta[name="csrf-token"]') || {}).content || '';

  document.addEventListener('submit', function (event) {
    const button = event.submitter || event.target.querySelector('button[data-confirm]');
    const question = button && button.getAttribute('data-confirm');
    if (question && !window.confirm(question)) { event.preventDefault(); }
  });

  async function getJSON(url) {
    const response = await fetch(url, {headers: {'Accept': 'application/json', 'X-CSRF-Token': csrf},
                                       credentials: 'same-origin'});
    if (!response.ok) { throw new Error(url + ': ' + response.status); }
    return response.json();
  }

  function pollOverview(section) {
    setInterval(async function () {
      try {
        const data = await getJSON(section.getAttribute('data-poll'));
        for (const [key, text] of Object.entries(data.display || {})) {
          const cell = section.querySelector('[data-live="' + key + '"]');
          if (cell) { cell.textContent = text; }
        }
      } catch (err) { /* the next tick tries again */ }
    }, 5000);
  }

  function pollTraining(section) {
    const watching = section.getAttribute('data-run');
    async function tick() {
      let data = null;
      try { data = await getJSON(section.getAttribute('data-poll')); } catch (err) { /* retry */ }
      if (data) {
        section.innerHTML = data.html;
        const running = data.running && String(data.running.run_id);
        if ((watching && !running) || (!watching && running)) { window.location.reload(); return; }
      }
      setTimeout(tick, watching ? 1000 : 5000);
    }
    setTimeout(tick, 1000);
  }

  const overview = document.querySelector('.cards[data-poll]');
  if (overview) { pollOverview(overview); }
  const progress = document.querySelector('#progress[data-poll]');
  if (progress) { pollTraining(progress); }
})();
"""
