// Matelike web chat: talks to the same OpenAI-compatible /v1/chat/completions the server offers to any client,
// reading the server-sent events with fetch + ReadableStream (EventSource cannot POST a body).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);

  // The page's words in Chinese when the browser prefers Chinese (the model speaks Chinese), else English as
  // written in index.html.
  const ZH = {
    newChat: "新对话", newChatTitle: "忘掉这段对话", settings: "设置", system: "系统提示",
    systemPlaceholder: "你是一个乐于助人的助手。（可不填）", temperature: "温度", maxTokens: "最多生成词元",
    apiKey: "API 密钥", apiKeyPlaceholder: "服务器需要时才填", inputPlaceholder: "输入消息；回车发送，Shift+回车换行",
    send: "发送", stop: "停止",
  };
  const prefersChinese = (navigator.languages && navigator.languages.length ? navigator.languages
                          : [navigator.language || ""])[0].toLowerCase().startsWith("zh");
  document.documentElement.lang = prefersChinese ? "zh-CN" : "en";
  if (prefersChinese) {
    document.querySelectorAll("[data-i18n]").forEach((el) => { el.textContent = ZH[el.dataset.i18n]; });
    document.querySelectorAll("[data-i18n-placeholder]").forEach((el) => {
      el.placeholder = ZH[el.dataset.i18nPlaceholder];
    });
    document.querySelectorAll("[data-i18n-title]").forEach((el) => { el.title = ZH[el.dataset.i18nTitle]; });
  }
  const messagesEl = $("messages"), inputEl = $("input"), sendBtn = $("send"), stopBtn = $("stop");
  const errorEl = $("error"), apiKeyEl = $("api-key");

  // The conversation as the API sees it; the system prompt is added at send time from its field.
  let history = [];
  let controller = null;  // AbortController of the answer being streamed, if any
  let chatNumber = 0;     // bumped by "New chat" so a late answer never lands in the next conversation

  apiKeyEl.value = sessionStorage.getItem("matelike-api-key") || "";
  apiKeyEl.addEventListener("change", () => sessionStorage.setItem("matelike-api-key", apiKeyEl.value));

  function headers() {
    const h = { "Content-Type": "application/json" };
    if (apiKeyEl.value) h["Authorization"] = "Bearer " + apiKeyEl.value;
    return h;
  }

  function showError(text) {
    errorEl.textContent = text;
    errorEl.hidden = !text;
  }

  function addBubble(role, text) {
    const div = document.createElement("div");
    div.className = "msg " + role;
    div.dataset.role = role;
    div.textContent = text;
    messagesEl.appendChild(div);
    messagesEl.scrollTop = messagesEl.scrollHeight;
    return div;
  }

  function setBusy(busy) {
    sendBtn.disabled = busy;
    stopBtn.disabled = !busy;
    document.body.dataset.busy = busy ? "1" : "0";
  }

  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      if (body && body.error && body.error.message) return body.error.message;
    } catch (e) { /* not JSON */ }
    return "HTTP " + resp.status;
  }

  async function send(text) {
    showError("");
    const userMsg = { role: "user", content: text };
    const myChat = chatNumber;
    const userBubble = addBubble("user", text);
    const bubble = addBubble("assistant", "");
    bubble.classList.add("streaming");
    bubble.dataset.chunks = "0";
    const system = $("system").value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(history, [userMsg]);
    // No model name until the server has told it: leaving it out means "the served model".
    const body = { messages: messages, stream: true };
    if ($("model-name").textContent) body.model = $("model-name").textContent;
    // Empty fields mean "server default"; anything else goes as typed and the server says if it is out of range.
    if ($("temperature").value !== "") body.temperature = Number($("temperature").value);
    if ($("max-tokens").value !== "") body.max_tokens = Math.floor(Number($("max-tokens").value));
    controller = new AbortController();
    setBusy(true);
    let answer = "", finished = false;
    try {
      const resp = await fetch("/v1/chat/completions", {
        method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
      });
      if (!resp.ok) throw new Error(await errorMessage(resp));
      const reader = resp.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        // Events are separated by a blank line; keep the incomplete tail for the next read.
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data:")) continue;
            const data = line.slice(5).trim();
            if (data === "[DONE]") { finished = true; continue; }
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            const choice = chunk.choices && chunk.choices[0];
            const piece = choice && choice.delta && choice.delta.content;
            if (piece) {
              answer += piece;
              bubble.textContent = answer;
              bubble.dataset.chunks = String(Number(bubble.dataset.chunks) + 1);
              messagesEl.scrollTop = messagesEl.scrollHeight;
            }
          }
        }
      }
    } catch (err) {
      if (err.name === "AbortError") {
        bubble.classList.add("stopped");
      } else {
        showError(String(err.message || err));
        if (!answer) bubble.remove();
      }
    } finally {
      bubble.classList.remove("streaming");
      bubble.dataset.done = finished ? "1" : "0";
      controller = null;
      setBusy(false);
    }
    // Keep the turn (also a stopped partial answer, as the user saw it) so the next message has context.
    if (myChat !== chatNumber) return;
    if (answer || finished) history.push(userMsg, { role: "assistant", content: answer });
    else if (!bubble.isConnected) userBubble.remove();  // failed before any answer: the turn did not happen
  }

  $("composer").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const text = inputEl.value.trim();
    if (!text || controller) return;
    inputEl.value = "";
    send(text);
  });
  inputEl.addEventListener("keydown", (ev) => {
    if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
      ev.preventDefault();
      $("composer").requestSubmit();
    }
  });
  stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
  $("new-chat").addEventListener("click", () => {
    if (controller) controller.abort();
    chatNumber += 1;
    history = [];
    messagesEl.replaceChildren();
    showError("");
    inputEl.focus();
  });

  function loadModelName() {
    fetch("/v1/models", { headers: headers() })
      .then((r) => (r.ok ? r.json() : null))
      .then((body) => { if (body && body.data && body.data[0]) $("model-name").textContent = body.data[0].id; })
      .catch(() => {});
  }
  apiKeyEl.addEventListener("change", loadModelName);  // a server started with --api-key answers only then
  loadModelName();
  setBusy(false);
})();
