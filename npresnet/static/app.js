// npresnet serve: choose or drop photos, see each at once, then its top-k classes from POST api/classify.
// Photos go to the server one request at a time, so that a page with many photos never floods its queue.
"use strict";

const MB = 1024 * 1024;
const elements = {
  model: document.getElementById("model"),
  notice: document.getElementById("notice"),
  input: document.getElementById("file"),
  limits: document.getElementById("limits"),
  toolbar: document.getElementById("toolbar"),
  clear: document.getElementById("clear"),
  results: document.getElementById("results"),
};
let info = null; // GET api/info, once it has answered
let queue = Promise.resolve();

function showNotice(text) {
  elements.notice.textContent = text;
  elements.notice.hidden = !text;
}

async function loadInfo() {
  try {
    const response = await fetch("api/info", { cache: "no-store" });
    info = await response.json();
  } catch (error) {
    elements.model.textContent = "Not connected.";
    showNotice("Cannot reach the server. Is npresnet serve still running?");
    return;
  }
  showNotice("");
  const parts = [info.arch, `${info.backend} backend`, `${info.num_classes} classes`, `top ${info.topk}`];
  if (info.weights) parts.push(`weights ${info.weights}`);
  elements.model.textContent = parts.join(" \u00b7 ");
  elements.limits.textContent = `Up to ${formatMB(info.max_upload_bytes)} per photo.`;
  if (!info.weights) {
    showNotice(`No weights were given: this ${info.arch} has random parameters, so its answers are meaningless.`);
  }
}

function formatMB(bytes) {
  return `${(bytes / MB).toFixed(bytes < 10 * MB ? 1 : 0)} MB`;
}

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function addCard(file) {
  const card = element("li", "result");
  const figure = element("figure", "preview");
  const image = element("img");
  image.alt = `Preview of ${file.name}`;
  image.src = URL.createObjectURL(file);
  image.addEventListener("error", () => {
    figure.replaceChildren("No preview");
    figure.classList.add("empty");
  });
  figure.append(image);
  const answer = element("div", "answer");
  const status = element("p", "status", "Waiting\u2026");
  answer.append(element("h2", "name", file.name), status);
  card.append(figure, answer);
  return { card, answer, status, image };
}

function showError(view, text, retry) {
  view.status.textContent = text;
  view.status.classList.add("error");
  if (retry) {
    const again = element("button", "secondary", "Try again");
    again.type = "button";
    again.addEventListener("click", () => {
      again.remove();
      view.status.classList.remove("error");
      enqueue(retry, view);
    });
    view.answer.append(again);
  }
}

function showAnswer(view, result) {
  view.status.remove();
  const list = element("ol", "top");
  for (const prediction of result.top) {
    const percent = prediction.probability * 100;
    const row = element("li", "prediction");
    const bar = element("span", "bar");
    const fill = element("span");
    fill.style.width = `${Math.min(percent, 100)}%`;
    bar.setAttribute("aria-hidden", "true");
    bar.append(fill);
    row.append(element("span", "label", prediction.label), element("span", "percent", `${percent.toFixed(2)}%`), bar);
    list.append(row);
  }
  const ms = result.ms < 10 ? result.ms.toFixed(1) : Math.round(result.ms);
  view.answer.append(list, element("p", "time", `server: ${ms} ms`));
}

async function classify(file, view) {
  if (!info) await loadInfo();
  if (file.type && !file.type.startsWith("image/")) {
    showError(view, `Not an image (${file.type}): choose a photo such as a JPEG or PNG.`);
    return;
  }
  if (info && file.size > info.max_upload_bytes) {
    showError(view, `Too large: ${formatMB(file.size)}; this server takes up to ${formatMB(info.max_upload_bytes)}.`);
    return;
  }
  view.status.textContent = "Classifying\u2026";
  const form = new FormData();
  form.append("file", file, file.name);
  let response;
  try {
    response = await fetch("api/classify", { method: "POST", body: form });
  } catch (error) {
    showError(view, "Cannot reach the server. Is npresnet serve still running?", file);
    return;
  }
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null; // a proxy's or waitress's own plain-text answer
  }
  if (response.ok && body && body.results && body.results[0].top) {
    showAnswer(view, body.results[0]);
  } else if (response.status === 503) {
    showError(view, (body && body.error) || "The server is busy; try again in a moment.", file);
  } else if (response.status === 413) {
    showError(view, (body && body.error) || "Too large for this server.");
  } else if (body && body.results && body.results[0].error) {
    showError(view, body.results[0].error);
  } else {
    showError(view, (body && body.error) || `The server answered ${response.status} ${response.statusText}.`);
  }
}

function enqueue(file, view) {
  view.status.textContent = "Waiting\u2026";
  queue = queue.then(() => classify(file, view));
}

// The newest photos go on top, in the order they were chosen.
function addFiles(files) {
  const views = files.map(addCard);
  elements.results.prepend(...views.map((view) => view.card));
  elements.toolbar.hidden = false;
  files.forEach((file, i) => enqueue(file, views[i]));
}

elements.input.addEventListener("change", () => {
  addFiles(Array.from(elements.input.files));
  elements.input.value = "";
});

elements.clear.addEventListener("click", () => {
  for (const image of elements.results.querySelectorAll("img")) URL.revokeObjectURL(image.src);
  elements.results.replaceChildren();
  elements.toolbar.hidden = true;
  elements.input.focus();
});

// Dropping works anywhere on the page; the drop area lights up while something is dragged over.
document.addEventListener("dragover", (event) => {
  event.preventDefault();
  document.body.classList.add("dragging");
});
document.addEventListener("dragleave", (event) => {
  if (!event.relatedTarget) document.body.classList.remove("dragging");
});
document.addEventListener("drop", (event) => {
  event.preventDefault();
  document.body.classList.remove("dragging");
  if (event.dataTransfer && event.dataTransfer.files.length) addFiles(Array.from(event.dataTransfer.files));
});

loadInfo();
