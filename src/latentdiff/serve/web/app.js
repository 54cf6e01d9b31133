// The page of `latentdiff serve` (serve/web.py): a form over the A1111 routes. Plain JS, no build step, nothing
// fetched from elsewhere. Each result keeps the settings its answer's `info` reports for it, which "Reuse
// parameters" puts back into the form.
"use strict";

const API = "/sdapi/v1";
const POLL_MS = 300;
const $ = (id) => document.getElementById(id);

async function getJSON(path, options) {
  const response = await fetch(path, options);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (!response.ok) {
    throw new Error(errorText(response, body));
  }
  return body;
}

// The server's errors: A1111-style {"detail": ...} (a string, or FastAPI's list), or OpenAI's {"error": {...}}.
function errorText(response, body) {
  if (body && typeof body.detail === "string") return body.detail;
  if (body && Array.isArray(body.detail)) return body.detail.map((d) => d.msg || JSON.stringify(d)).join("; ");
  if (body && body.error && body.error.message) return body.error.message;
  return `HTTP ${response.status} ${response.statusText}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message || "";
  box.hidden = !message;
}

function option(select, value, text) {
  const item = document.createElement("option");
  item.value = value;
  item.textContent = text;
  select.appendChild(item);
  return item;
}

async function loadChoices() {
  const [samplers, schedulers, loras, defaults] = await Promise.all([
    getJSON(`${API}/samplers`), getJSON(`${API}/schedulers`), getJSON(`${API}/loras`), getJSON("/web/defaults"),
  ]);
  for (const sampler of samplers) option($("sampler"), sampler.name, sampler.name);
  for (const schedule of schedulers) {
    if (schedule.name !== "automatic") option($("scheduler"), schedule.name, schedule.label || schedule.name);
  }
  for (const lora of loras) option($("lora"), lora.name, lora.alias && lora.alias !== lora.name
    ? `${lora.name} (${lora.alias})` : lora.name);
  $("width").value = defaults.width;
  $("height").value = defaults.height;
  $("model").textContent = defaults.model;
}

// The LoRA picker adds `<lora:NAME:1>` to the prompt (A1111's syntax: the weight can be edited there).
function addLora() {
  const name = $("lora").value;
  if (!name) return;
  const prompt = $("prompt");
  const tag = `<lora:${name}:1>`;
  if (!prompt.value.includes(tag)) prompt.value = prompt.value ? `${prompt.value.trimEnd()} ${tag}` : tag;
  $("lora").value = "";
  prompt.focus();
}

function formRequest() {
  const request = {
    prompt: $("prompt").value,
    negative_prompt: $("negative").value,
    width: parseInt($("width").value, 10),
    height: parseInt($("height").value, 10),
    steps: parseInt($("steps").value, 10),
    cfg_scale: parseFloat($("cfg").value),
    seed: parseInt($("seed").value, 10),
    batch_size: 1,
    n_iter: 1,
  };
  if ($("sampler").value) request.sampler_name = $("sampler").value;
  if ($("scheduler").value) request.scheduler = $("scheduler").value;
  // cfg_truncation (latentdiff's key): guidance for that fraction of the steps; empty: every step guided
  if ($("cfg_truncation").value !== "") request.cfg_truncation = parseFloat($("cfg_truncation").value);
  return request;
}

// ---- progress: /progress every POLL_MS while a request runs -------------------------------------------------
let polling = null;

function startProgress() {
  $("progress").value = 0;
  $("status").textContent = "queued";
  polling = setInterval(pollProgress, POLL_MS);
}

async function pollProgress() {
  try {
    const state = await getJSON(`${API}/progress?skip_current_image=false`);
    if (polling === null) return;
    $("progress").value = Math.max(0, Math.min(1, state.progress || 0));
    const job = state.state || {};
    $("status").textContent = job.sampling_steps
      ? `step ${job.sampling_step} of ${job.sampling_steps}` : (state.textinfo || "");
    if (state.current_image) {
      $("preview").src = `data:image/png;base64,${state.current_image}`;
      $("preview").hidden = false;
    }
  } catch (_) {
    // a missed poll is not an error of the request: the next one tries again
  }
}

function stopProgress(done) {
  clearInterval(polling);
  polling = null;
  $("progress").value = done ? 1 : 0;
  $("status").textContent = done ? "done" : "";
  $("preview").hidden = true;
}

// ---- results ----------------------------------------------------------------------------------------------------
// The settings of image i of an answer, from its `info` (A1111's names).
function imageSettings(info, i) {
  const pick = (all, one) => (Array.isArray(all) && all[i] !== undefined ? all[i] : one);
  return {
    prompt: pick(info.all_prompts, info.prompt),
    negative: pick(info.all_negative_prompts, info.negative_prompt),
    seed: pick(info.all_seeds, info.seed),
    width: info.width, height: info.height, steps: info.steps, cfg: info.cfg_scale, sampler: info.sampler_name,
    scheduler: info.scheduler, cfg_truncation: info.cfg_truncation,
  };
}

function addResult(image, infotext, settings) {
  const result = $("result-template").content.firstElementChild.cloneNode(true);
  const img = result.querySelector("img");
  img.src = `data:image/png;base64,${image}`;
  img.alt = `Generated image: ${settings.prompt || ""}`;
  result.querySelector(".params").textContent = infotext || "";
  result.querySelector(".reuse").addEventListener("click", () => reuse(settings));
  $("gallery").prepend(result);
}

function reuse(settings) {
  const set = (id, value) => { if (value !== undefined && value !== null) $(id).value = value; };
  set("prompt", settings.prompt);
  set("negative", settings.negative);
  set("seed", settings.seed);
  set("width", settings.width);
  set("height", settings.height);
  set("steps", settings.steps);
  set("cfg", settings.cfg);
  $("cfg_truncation").value = settings.cfg_truncation === undefined || settings.cfg_truncation === null
    ? "" : settings.cfg_truncation;
  if (settings.sampler) {
    const known = Array.from($("sampler").options).some((o) => o.value === settings.sampler);
    if (!known) option($("sampler"), settings.sampler, settings.sampler);
    $("sampler").value = settings.sampler;
  }
  // the answer names the schedule by its label ("Karras"); the picker's values are the names ("karras")
  const wanted = (settings.scheduler || "").toLowerCase();
  const schedule = Array.from($("scheduler").options).find(
    (o) => o.value && (o.value.toLowerCase() === wanted || o.textContent.toLowerCase() === wanted));
  $("scheduler").value = schedule ? schedule.value : "";
  $("prompt").focus();
}

async function generate(event) {
  event.preventDefault();
  showError("");
  $("generate").disabled = true;
  $("interrupt").disabled = false;
  startProgress();
  let done = false;
  try {
    const answer = await getJSON(`${API}/txt2img`, {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(formRequest()),
    });
    const info = typeof answer.info === "string" ? JSON.parse(answer.info) : (answer.info || {});
    const infotexts = info.infotexts || [];
    answer.images.forEach((image, i) => addResult(image, infotexts[i], imageSettings(info, i)));
    done = true;
  } catch (error) {
    showError(error.message);
  } finally {
    stopProgress(done);
    $("generate").disabled = false;
    $("interrupt").disabled = true;
  }
}

async function interrupt() {
  try {
    await getJSON(`${API}/interrupt`, { method: "POST" });
  } catch (error) {
    showError(error.message);
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("form").addEventListener("submit", generate);
  $("interrupt").addEventListener("click", interrupt);
  $("lora").addEventListener("change", addLora);
  loadChoices().catch((error) => showError(`could not load the server's choices: ${error.message}`));
});
