// The search page: POST /rank (explain=true) as any client would, then GET /items/{id} for each
// shown product's title and GET /items/{id}/image for its photo. No build step, no libraries.
"use strict";

(() => {
  const DEFAULT_CANDIDATES = 200; // the API's default retrieve_k
  const DEFAULT_TOP_K = 10;
  const MAX_SHOWN = 100;
  const FIELD_NAMES = {
    query: "Search products",
    retrieve_k: "Candidates",
    top_k: "Show top",
    candidate_ids: "Candidates",
    image: "Photo",
    like_id: "More like this",
  };
  // Facets over the shown results: ticking values filters the next searches (POST /rank's
  // filters: one-of per attribute, all attributes at once) until they are unticked.
  const FACETS = [
    ["gender", "Gender"],
    ["articleType", "Type"],
    ["baseColour", "Colour"],
    ["usage", "Usage"],
  ];
  const activeFilters = new Map(); // attribute -> Set of ticked values
  let likeOf = null; // {id, title}: "more like this" item, until the next typed search
  let photo = null; // {name, base64}: search by photo, until the next typed search

  const $ = (id) => document.getElementById(id);
  const form = $("search");
  const queryInput = $("query");
  const candidatesInput = $("candidates");
  const topKInput = $("top-k");
  const compareInput = $("compare");
  const button = form.querySelector("button");
  const errorBox = $("error");
  const statusBox = $("status");
  const itemCache = new Map(); // id -> Promise of {id, title, attributes, image} or {id, error}
  let searchNumber = 0;

  function showError(message) {
    errorBox.textContent = message;
    errorBox.hidden = false;
  }

  function whole(input, name) {
    const raw = input.value.trim();
    if (raw === "") return null;
    const value = Number(raw);
    if (!Number.isInteger(value) || value < 1) {
      throw new Error(`${name} must be a whole number of at least 1 (got "${raw}").`);
    }
    return value;
  }

  function describeFailure(status, data, text) {
    const detail = data && data.detail;
    if (status === 422 && Array.isArray(detail)) {
      const problems = detail.map((error) => {
        const field = error.loc[error.loc.length - 1];
        return `${FIELD_NAMES[field] || field}: ${error.msg}`;
      });
      return `The service refused this search. ${problems.join("; ")}.`;
    }
    const said = typeof detail === "string" ? detail : text.slice(0, 300) || "no details given";
    if (status === 503) return `The service cannot rank right now: ${said}`;
    if (status === 413) return `The search is too large for the service: ${said}`;
    return `The search failed (HTTP ${status}): ${said}`;
  }

  async function getJson(url, options) {
    let response;
    try {
      response = await fetch(url, options);
    } catch (error) {
      throw new Error(`Could not reach the service (${error.message}).`);
    }
    const text = await response.text();
    let data = null;
    try {
      data = JSON.parse(text);
    } catch {
      // not JSON: described from the text below
    }
    if (!response.ok) throw new Error(describeFailure(response.status, data, text));
    if (data === null) throw new Error(`The service answered ${url} with something other than JSON.`);
    return data;
  }

  function itemDetails(id) {
    if (!itemCache.has(id)) {
      const url = `/items/${encodeURIComponent(id)}`;
      const pending = getJson(url).catch((error) => {
        itemCache.delete(id); // try again next time
        return { id, error: error.message };
      });
      itemCache.set(id, pending);
    }
    return itemCache.get(id);
  }

  const signed = (x) => (x >= 0 ? "+" : "\u2212") + Math.abs(x).toFixed(2);

  function parts(entry) {
    if (entry.text_contribution == null || entry.image_contribution == null) return null;
    const text = entry.text_contribution;
    const image = entry.image_contribution;
    return { text, image, joint: entry.score - text - image };
  }

  // One scale for every bar on the page: positive parts stack right of the zero line,
  // negative parts left of it.
  function barScale(entries) {
    let right = 0;
    let left = 0;
    for (const entry of entries) {
      const p = parts(entry);
      if (!p) continue;
      const values = [p.text, p.image, p.joint];
      right = Math.max(right, values.filter((v) => v > 0).reduce((a, b) => a + b, 0));
      left = Math.max(left, -values.filter((v) => v < 0).reduce((a, b) => a + b, 0));
    }
    const total = right + left || 1;
    return { zero: (left / total) * 100, unit: 100 / total };
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function bar(p, scale) {
    const node = el("div", "bar");
    node.setAttribute("role", "img");
    node.setAttribute(
      "aria-label",
      `score parts: text ${signed(p.text)}, image ${signed(p.image)}, joint ${signed(p.joint)}`,
    );
    let right = scale.zero;
    let left = scale.zero;
    for (const [name, value] of [["text", p.text], ["image", p.image], ["joint", p.joint]]) {
      const width = Math.abs(value) * scale.unit;
      const seg = el("span", `seg ${name}`);
      seg.title = `${name} ${signed(value)}`;
      if (value >= 0) {
        seg.style.left = `${right}%`;
        right += width;
      } else {
        left -= width;
        seg.style.left = `${left}%`;
      }
      seg.style.width = `${width}%`;
      node.append(seg);
    }
    const zero = el("span", "zero");
    zero.style.left = `${scale.zero}%`;
    node.append(zero);
    return node;
  }

  function card(entry, place, detail, scale, badge) {
    const item = el("li", "card");
    item.dataset.id = entry.id;
    item.dataset.rank = String(place);
    const rank = el("span", "rank", `#${place}`);
    rank.setAttribute("aria-hidden", "true");
    item.append(rank);
    if (badge) item.append(el("span", "moved", badge));

    const title = detail.title || `Product ${entry.id}`;
    const image = el("img");
    image.src = detail.image || `/items/${encodeURIComponent(entry.id)}/image`;
    image.alt = detail.title ? `Photo: ${detail.title}` : `Photo of product ${entry.id}`;
    image.width = 60;
    image.height = 80;
    image.addEventListener("error", () => {
      image.alt = `No photo available for product ${entry.id}`;
    });
    item.append(image);

    item.append(el("h3", "title", title));
    if (detail.error) {
      item.append(el("p", "attrs", `Details unavailable: ${detail.error}`));
    } else {
      const a = detail.attributes || {};
      const known = [a.articleType, a.baseColour, a.gender, a.usage].filter(Boolean);
      item.append(el("p", "attrs", known.join(" \u00b7 ")));
    }
    item.append(el("p", "score", `score ${entry.score.toFixed(3)}`));
    const p = parts(entry);
    if (p) {
      item.append(bar(p, scale));
      item.append(
        el("p", "parts", `text ${signed(p.text)} \u00b7 image ${signed(p.image)} \u00b7 joint ${signed(p.joint)}`),
      );
    }
    const more = el("button", "more", "More like this");
    more.type = "button";
    more.addEventListener("click", () => {
      likeOf = { id: entry.id, title };
      photo = null;
      search();
    });
    item.append(more);
    return item;
  }

  function fill(list, entries, details, scale, badgeFor) {
    list.replaceChildren(
      ...entries.map((entry, i) => card(entry, i + 1, details.get(entry.id), scale, badgeFor(entry))),
    );
    if (!entries.length) list.append(el("li", "empty", "No products found."));
  }

  function requestFilters() {
    if (!activeFilters.size) return null;
    return Object.fromEntries([...activeFilters].map(([name, values]) => [name, [...values]]));
  }

  function renderFacets(details) {
    const box = $("facets");
    box.replaceChildren();
    for (const [name, label] of FACETS) {
      const counts = new Map();
      for (const detail of details.values()) {
        const value = detail.attributes && detail.attributes[name];
        if (value) counts.set(value, (counts.get(value) || 0) + 1);
      }
      for (const value of activeFilters.get(name) || []) {
        if (!counts.has(value)) counts.set(value, 0); // ticked: stays offered to untick
      }
      if (!counts.size) continue;
      const group = el("fieldset", "facet");
      group.append(el("legend", null, label));
      const ordered = [...counts].sort((a, b) => b[1] - a[1] || a[0].localeCompare(b[0]));
      for (const [value, count] of ordered) {
        const input = el("input");
        input.type = "checkbox";
        input.id = `facet-${name}-${value}`.replace(/[^A-Za-z0-9-]+/g, "-");
        input.dataset.attribute = name;
        input.value = value;
        input.checked = Boolean(activeFilters.get(name)?.has(value));
        input.addEventListener("change", () => {
          const values = activeFilters.get(name) || new Set();
          if (input.checked) values.add(value);
          else values.delete(value);
          if (values.size) activeFilters.set(name, values);
          else activeFilters.delete(name);
          search();
        });
        const text = el("label", null, `${value} (${count})`);
        text.htmlFor = input.id;
        const row = el("div", "facet-value");
        row.append(input, text);
        group.append(row);
      }
      box.append(group);
    }
    box.hidden = !box.childElementCount;
  }

  function clearResults() {
    $("fused").hidden = true;
    $("text-side").hidden = true;
    $("legend").hidden = true;
    $("fused-list").replaceChildren();
    $("text-list").replaceChildren();
  }

  function remember(query, candidates, topK, compare) {
    const params = new URLSearchParams({ q: query });
    if (candidates !== null) params.set("candidates", candidates);
    if (topK !== null) params.set("top", topK);
    if (compare) params.set("compare", "1");
    history.replaceState(null, "", `?${params}`);
  }

  async function search(event) {
    if (event) event.preventDefault();
    errorBox.hidden = true;
    if (event) {
      likeOf = null; // a typed search leaves "more like this" and the photo
      photo = null;
    }
    const query = queryInput.value.trim();
    if (!query && !likeOf && !photo) {
      showError("Type what you are looking for first.");
      queryInput.focus();
      return;
    }
    let candidates;
    let topK;
    try {
      candidates = whole(candidatesInput, "Candidates");
      topK = whole(topKInput, "Show top");
      if (topK !== null && topK > MAX_SHOWN) {
        throw new Error(`Show top: this page shows at most ${MAX_SHOWN} products.`);
      }
    } catch (error) {
      showError(error.message);
      return;
    }
    const compare = compareInput.checked;
    const shown = topK ?? DEFAULT_TOP_K;
    const body = { explain: true };
    if (likeOf) body.like_id = likeOf.id;
    else if (photo) body.image = photo.base64;
    else body.query = query;
    if (compare) {
      // The text-side ranking needs every candidate's text contribution: ask for all of them.
      body.retrieve_k = candidates ?? DEFAULT_CANDIDATES;
      body.top_k = body.retrieve_k;
    } else {
      if (candidates !== null) body.retrieve_k = candidates;
      if (topK !== null) body.top_k = topK;
    }
    const filters = requestFilters();
    if (filters) body.filters = filters;
    remember(query, candidates, topK, compare);

    const number = ++searchNumber;
    button.disabled = true;
    statusBox.textContent = "Ranking\u2026";
    const started = performance.now();
    try {
      const answer = await getJson("/rank", {
        method: "POST",
        headers: { "content-type": "application/json" },
        body: JSON.stringify(body),
      });
      const fused = compare ? answer.items.slice(0, shown) : answer.items;
      const byText = compare
        ? [...answer.items].sort((a, b) => b.text_contribution - a.text_contribution)
        : [];
      const textSide = byText.slice(0, shown);
      const ids = [...new Set([...fused, ...textSide].map((entry) => entry.id))];
      const details = new Map((await Promise.all(ids.map(itemDetails))).map((d, i) => [ids[i], d]));
      if (number !== searchNumber) return; // a newer search has started
      const elapsed = Math.round(performance.now() - started);

      const scale = barScale([...fused, ...textSide]);
      const fusedPlace = new Map(answer.items.map((entry, i) => [entry.id, i + 1]));
      const textPlace = new Map(byText.map((entry, i) => [entry.id, i + 1]));
      fill($("fused-list"), fused, details, scale, (e) => (compare ? `text-only #${textPlace.get(e.id)}` : ""));
      fill($("text-list"), textSide, details, scale, (e) => `#${fusedPlace.get(e.id)} with photo`);
      $("fused").hidden = false;
      $("text-side").hidden = !compare;
      $("legend").hidden = !fused.length;
      renderFacets(new Map(fused.map((entry) => [entry.id, details.get(entry.id)])));

      const pool = body.retrieve_k ? `${body.retrieve_k} candidates` : "the default candidates";
      const what = likeOf
        ? `like \u201c${likeOf.title}\u201d`
        : photo
          ? `like your photo ${photo.name}`
          : `for \u201c${query}\u201d`;
      let status = `${fused.length} products ${what} from ${pool}, model ${
        answer.model_version
      }, ${elapsed} ms.`;
      if (filters) {
        const named = Object.entries(filters).map(([k, v]) => `${k} ${v.join(" or ")}`);
        status += ` Only ${named.join(", ")}.`;
      }
      if (answer.missing_ids.length) {
        status += ` ${answer.missing_ids.length} candidates have no stored features and were left out.`;
      }
      const failed = [...details.values()].filter((d) => d.error);
      if (failed.length) {
        showError(`Details of ${failed.length} products could not be loaded: ${failed[0].error}`);
      }
      statusBox.textContent = status;
    } catch (error) {
      if (number !== searchNumber) return;
      clearResults();
      statusBox.textContent = "";
      showError(error.message);
    } finally {
      if (number === searchNumber) button.disabled = false;
    }
  }

  form.addEventListener("submit", search);

  function searchByPhoto(file) {
    if (!file) return;
    const reader = new FileReader();
    reader.addEventListener("load", () => {
      likeOf = null;
      photo = { name: file.name, base64: String(reader.result).split(",", 2)[1] || "" };
      search();
    });
    reader.addEventListener("error", () => showError(`Could not read ${file.name}.`));
    reader.readAsDataURL(file);
  }
  const photoInput = $("photo");
  photoInput.addEventListener("change", () => searchByPhoto(photoInput.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (event) => event.preventDefault());
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    searchByPhoto(event.dataTransfer.files[0]);
  });

  const params = new URLSearchParams(location.search);
  if (params.get("q")) {
    queryInput.value = params.get("q");
    candidatesInput.value = params.get("candidates") || "";
    topKInput.value = params.get("top") || "";
    compareInput.checked = params.get("compare") === "1";
    search();
  } else {
    queryInput.focus();
  }
})();
