// The demo's live voice mode, in the browser: the microphone streamed to /v1/realtime over a WebSocket (OpenAI's
// Realtime API, GA event names), the server's VAD taking the turns, the reply's speech played as it streams and its
// text and transcript written as they come; speaking while the reply plays stops the playback (barge-in: the server
// cancels the response, the page truncates the reply to what was heard).
//
//   window.omniLive.start({url, secret, voice, instructions})   // from demos/live_voice.py (a client secret)
//   window.omniLive.stop()
//
// Audio in: getUserMedia -> AudioContext at 24 kHz (the browser resamples the microphone) -> an AudioWorklet that
// packs 100 ms of PCM16 -> base64 -> input_audio_buffer.append. Audio out: response.output_audio.delta (base64 PCM16,
// mono, 24 kHz) -> AudioBuffers scheduled back to back. `window.omniLive.stats` is what the page saw (tests read it).
(() => {
  const RATE = 24000; // the Realtime API's audio/pcm rate, both ways
  const CHUNK = 2400; // samples per input_audio_buffer.append: 100 ms
  const WORKLET = `
    class Pcm16Capture extends AudioWorkletProcessor {
      constructor() { super(); this.buf = new Int16Array(${CHUNK}); this.n = 0; }
      process(inputs) {
        const ch = inputs[0] && inputs[0][0];
        if (ch) for (let i = 0; i < ch.length; i++) {
          const s = Math.max(-1, Math.min(1, ch[i]));
          this.buf[this.n++] = s < 0 ? s * 0x8000 : s * 0x7fff;
          if (this.n === this.buf.length) { this.port.postMessage(this.buf.slice().buffer); this.n = 0; }
        }
        return true;
      }
    }
    registerProcessor('pcm16-capture', Pcm16Capture);`;

  const live = window.omniLive = {
    ws: null, ctx: null, mic: null, node: null,
    sources: [], playhead: 0, // scheduled AudioBufferSourceNodes; when the last one ends (AudioContext time)
    reply: null, // the response being received: {id, itemId, el, text, transcript, startAt, audioMs}
    stats: {events: [], audioDeltas: 0, audioBytes: 0, sentChunks: 0, responses: {}, bargeIns: 0, errors: []},
  };

  const $ = (id) => document.getElementById(id);
  function setState(text) { const el = $('live-state'); if (el) el.textContent = text; }

  function b64encode(buf) {
    const u = new Uint8Array(buf);
    let s = '';
    for (let i = 0; i < u.length; i += 0x8000) s += String.fromCharCode.apply(null, u.subarray(i, i + 0x8000));
    return btoa(s);
  }
  function b64decode(text) {
    const bin = atob(text), u = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) u[i] = bin.charCodeAt(i);
    return u.buffer;
  }

  function line(cls, text) {
    const log = $('live-log');
    const el = document.createElement('div');
    el.className = 'live-' + cls;
    el.textContent = text;
    if (log) { log.appendChild(el); log.scrollTop = log.scrollHeight; }
    return el;
  }

  function send(ev) { if (live.ws && live.ws.readyState === WebSocket.OPEN) live.ws.send(JSON.stringify(ev)); }

  // ------------------------------------------------------------------------------------------------ playback
  function play(buf) {
    const ctx = live.ctx, pcm = new Int16Array(buf);
    if (!ctx || !pcm.length) return;
    const f = new Float32Array(pcm.length);
    for (let i = 0; i < pcm.length; i++) f[i] = pcm[i] / 32768;
    const b = ctx.createBuffer(1, f.length, RATE);
    b.copyToChannel(f, 0);
    const src = ctx.createBufferSource();
    src.buffer = b;
    src.connect(ctx.destination);
    const at = Math.max(ctx.currentTime + 0.05, live.playhead);
    src.start(at);
    live.playhead = at + b.duration;
    live.sources.push(src);
    src.onended = () => { live.sources = live.sources.filter((s) => s !== src); };
    const r = live.reply;
    if (r) { if (r.startAt === null) r.startAt = at; r.audioMs += 1000 * b.duration; }
  }

  function playing() { return live.ctx && live.playhead > live.ctx.currentTime; }

  function stopPlayback() {
    for (const s of live.sources) { try { s.stop(); } catch (e) { /* not started yet */ } }
    live.sources = [];
    live.playhead = 0;
  }

  // barge-in: the user speaks while the reply plays. Stop the speaker; tell the server how much was heard (the next
  // turn's context holds only that); with server VAD the server cancels a response still being generated itself.
  function bargeIn() {
    const r = live.reply;
    const heardMs = r && r.startAt !== null ? Math.max(0, Math.round(1000 * (live.ctx.currentTime - r.startAt))) : 0;
    stopPlayback();
    live.stats.bargeIns += 1;
    if (r && r.itemId) {
      send({type: 'conversation.item.truncate', item_id: r.itemId, content_index: 0,
            audio_end_ms: Math.min(heardMs, Math.round(r.audioMs))});
      r.el.textContent += '  [interrupted]';
    }
  }

  // ------------------------------------------------------------------------------------------------ server events
  function onEvent(ev) {
    const st = live.stats;
    st.events.push(ev.type);
    switch (ev.type) {
      case 'session.created':
        setState('Live voice: listening (speak; pauses end your turn)');
        break;
      case 'input_audio_buffer.speech_started':
        // a barge-in whether the reply is still being generated (the server cancels it) or only still playing
        if (playing() || (live.reply && st.responses[live.reply.id] === 'in_progress')) bargeIn();
        setState('Live voice: hearing you ...');
        break;
      case 'input_audio_buffer.speech_stopped':
        setState('Live voice: thinking ...');
        break;
      case 'input_audio_buffer.committed':
        line('user', '🎤 (you spoke)');
        break;
      case 'response.created':
        live.reply = {id: ev.response.id, itemId: null, el: line('assistant', ''), text: '', transcript: '',
                      startAt: null, audioMs: 0};
        st.responses[ev.response.id] = 'in_progress';
        break;
      case 'response.output_item.added':
        if (live.reply && ev.item) live.reply.itemId = ev.item.id;
        break;
      case 'response.output_text.delta':
      case 'response.output_audio_transcript.delta':
        if (live.reply) {
          live.reply[ev.type === 'response.output_text.delta' ? 'text' : 'transcript'] += ev.delta;
          live.reply.el.textContent = live.reply.text || live.reply.transcript;
        }
        break;
      case 'response.output_audio.delta': {
        const buf = b64decode(ev.delta);
        st.audioDeltas += 1;
        st.audioBytes += buf.byteLength;
        if (live.reply && live.reply.id === ev.response_id) play(buf);
        setState('Live voice: speaking (talk to interrupt)');
        break;
      }
      case 'response.done': {
        const status = ev.response.status;
        st.responses[ev.response.id] = status;
        if (status === 'cancelled' && live.reply && live.reply.id === ev.response.id) stopPlayback();
        setState('Live voice: listening');
        break;
      }
      case 'error':
        st.errors.push(ev.error);
        line('error', '⚠️ ' + (ev.error && ev.error.message));
        break;
      default:
        break;
    }
  }

  // ------------------------------------------------------------------------------------------------ start / stop
  live.start = async (cfg) => {
    if (typeof cfg === 'string') cfg = JSON.parse(cfg);
    if (!cfg || !cfg.url) return;
    if (cfg.error) { setState('Live voice: ' + cfg.error); return; }
    live.stop();
    setState('Live voice: starting the microphone ...');
    try {
      live.ctx = new AudioContext({sampleRate: RATE});
      await live.ctx.resume();
      live.mic = await navigator.mediaDevices.getUserMedia(
        {audio: {channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true}});
      const url = URL.createObjectURL(new Blob([WORKLET], {type: 'application/javascript'}));
      await live.ctx.audioWorklet.addModule(url);
      live.node = new AudioWorkletNode(live.ctx, 'pcm16-capture');
      live.ctx.createMediaStreamSource(live.mic).connect(live.node);
    } catch (e) {
      setState('Live voice: no microphone (' + e + ')');
      live.stop();
      return;
    }
    const ws = live.ws = new WebSocket(cfg.url, ['realtime', 'openai-insecure-api-key.' + cfg.secret]);
    ws.onopen = () => {
      send({type: 'session.update', session: {
        type: 'realtime', output_modalities: ['audio'], instructions: cfg.instructions || undefined,
        audio: {input: {format: {type: 'audio/pcm', rate: RATE},
                        turn_detection: {type: 'server_vad', threshold: 0.5, prefix_padding_ms: 300,
                                         silence_duration_ms: cfg.silence_ms || 500}},
                output: {format: {type: 'audio/pcm', rate: RATE}, voice: cfg.voice || undefined}}}});
      live.node.port.onmessage = (m) => {
        send({type: 'input_audio_buffer.append', audio: b64encode(m.data)});
        live.stats.sentChunks += 1;
      };
    };
    ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { live.stats.errors.push(String(e)); } };
    ws.onclose = (e) => { if (live.ws === ws) { setState('Live voice: off (' + (e.reason || 'closed') + ')'); } };
    ws.onerror = () => setState('Live voice: cannot reach ' + cfg.url);
  };

  live.stop = () => {
    stopPlayback();
    if (live.node) { live.node.port.onmessage = null; live.node.disconnect(); }
    if (live.mic) live.mic.getTracks().forEach((t) => t.stop());
    if (live.ws) { const ws = live.ws; live.ws = null; ws.close(1000, 'stopped'); }
    if (live.ctx) live.ctx.close();
    live.node = live.mic = live.ctx = live.reply = null;
    setState('Live voice: off');
  };
})();
