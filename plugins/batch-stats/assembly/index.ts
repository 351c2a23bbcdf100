// batch-stats: per-device statistics over a batch of telemetry (flux plugin ABI 1).
//
// on_batch receives a JSON array of envelopes, one per event in the batch:
//   [{"topic": "devices/a/telemetry", "device_id": "a", "payload": {"temperature": 21.5}}, ...]
// and returns one output per device seen in the batch:
//   {"index": <the device's last event in the batch>,
//    "payload": {"device_id": "a", "count": 12,
//                "fields": {"temperature": {"count": 12, "min": 20.1, "max": 22.4,
//                                           "mean": 21.3, "last": 22.4}, ...}}}
// Only top-level numeric payload fields are summarised. No topic is given, so the host uses
// output_topic = "devices/{device_id}/stats" with the device of event `index`.
// This is the downsampling step of a gateway: N raw readings in, one summary per device out.
//
// Build: asc assembly/index.ts -O3 --runtime incremental (see scripts/build_plugins.sh).

// ---- ABI 1 exports ------------------------------------------------------------------------

export function flux_alloc(size: u32): usize {
  return heap.alloc(<usize>max<u32>(size, 1));
}

export function flux_free(ptr: usize, size: u32): void {
  if (ptr != 0) heap.free(ptr);
}

export function flux_abi_version(): i32 {
  return 1;
}

// The last output, kept referenced so the garbage collector leaves it alone until the next
// call (the ABI: output stays valid until the host calls into the instance again).
let lastOutput: ArrayBuffer | null = null;

export function on_batch(ptr: usize, len: u32): i64 {
  lastOutput = null;
  const parser = new Parser(ptr, ptr + <usize>len);
  let text: string;
  if (!parser.batch()) {
    text = '{"error":' + jsonString(parser.error) + "}";
  } else {
    text = render(parser.devices, parser.order);
  }
  const out = String.UTF8.encode(text);
  lastOutput = out;
  return (<i64>changetype<usize>(out) << 32) | <i64>out.byteLength;
}

// Called by the AssemblyScript runtime on a failed assertion: trap, the host recycles us.
function abortHandler(message: string | null, file: string | null, line: u32, column: u32): void {
  unreachable();
}

// ---- statistics ---------------------------------------------------------------------------

class FieldStats {
  count: i32 = 0;
  min: f64 = Infinity;
  max: f64 = -Infinity;
  sum: f64 = 0;
  last: f64 = 0;

  add(value: f64): void {
    this.count += 1;
    if (value < this.min) this.min = value;
    if (value > this.max) this.max = value;
    this.sum += value;
    this.last = value;
  }
}

class DeviceStats {
  count: i32 = 0;
  lastIndex: i32 = 0;
  fields: Map<string, FieldStats> = new Map();
  fieldOrder: string[] = [];

  add(key: string, value: f64): void {
    if (!this.fields.has(key)) {
      this.fields.set(key, new FieldStats());
      this.fieldOrder.push(key);
    }
    this.fields.get(key).add(value);
  }
}

function num(value: f64): string {
  if (!isFinite(value)) return "null";
  const rounded = Math.round(value * 1000) / 1000;
  if (rounded == Math.floor(rounded) && Math.abs(rounded) < 1e15) {
    return (<i64>rounded).toString();
  }
  return rounded.toString();
}

function jsonString(s: string): string {
  let out = '"';
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c == 0x22) out += '\\"';
    else if (c == 0x5c) out += "\\\\";
    else if (c < 0x20) out += " ";
    else out += String.fromCharCode(c);
  }
  return out + '"';
}

function render(devices: Map<string, DeviceStats>, order: string[]): string {
  let out = "[";
  for (let d = 0; d < order.length; d++) {
    const id = order[d];
    const device = devices.get(id);
    if (d > 0) out += ",";
    out += '{"index":' + device.lastIndex.toString() + ',"payload":{"device_id":';
    // Keys and ids keep their original JSON escapes, so they can be echoed between quotes.
    out += id.length > 0 ? '"' + id + '"' : "null";
    out += ',"count":' + device.count.toString() + ',"fields":{';
    for (let f = 0; f < device.fieldOrder.length; f++) {
      const key = device.fieldOrder[f];
      const s = device.fields.get(key);
      if (f > 0) out += ",";
      out += '"' + key + '":{"count":' + s.count.toString();
      out += ',"min":' + num(s.min) + ',"max":' + num(s.max);
      out += ',"mean":' + num(s.sum / <f64>s.count) + ',"last":' + num(s.last) + "}";
    }
    out += "}}}";
  }
  return out + "]";
}

// ---- a small JSON scanner over linear memory ----------------------------------------------

const QUOTE: u8 = 0x22;
const BACKSLASH: u8 = 0x5c;

class Parser {
  pos: usize;
  end: usize;
  error: string = "";
  devices: Map<string, DeviceStats> = new Map();
  order: string[] = [];

  constructor(start: usize, end: usize) {
    this.pos = start;
    this.end = end;
  }

  peek(): i32 {
    return this.pos < this.end ? <i32>load<u8>(this.pos) : -1;
  }

  ws(): void {
    while (this.pos < this.end) {
      const c = load<u8>(this.pos);
      if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) break;
      this.pos++;
    }
  }

  fail(message: string): bool {
    if (this.error.length == 0) this.error = message;
    return false;
  }

  expect(c: i32): bool {
    this.ws();
    if (this.peek() != c) return this.fail("expected '" + String.fromCharCode(c) + "'");
    this.pos++;
    return true;
  }

  // A string's contents (escapes kept as written); "" plus an error when malformed.
  str(): string {
    this.ws();
    if (this.peek() != QUOTE) {
      this.fail("expected a string");
      return "";
    }
    const start = ++this.pos;
    while (this.pos < this.end) {
      const c = load<u8>(this.pos);
      if (c == QUOTE) {
        const s = String.UTF8.decodeUnsafe(start, this.pos - start);
        this.pos++;
        return s;
      }
      this.pos += c == BACKSLASH ? 2 : 1;
    }
    this.fail("unterminated string");
    return "";
  }

  // Skip any value; returns its byte range through `valueStart` / this.pos.
  skip(depth: i32): bool {
    if (depth > 64) return this.fail("nesting too deep");
    this.ws();
    const c = this.peek();
    if (c == QUOTE) {
      this.str();
      return this.error.length == 0;
    }
    if (c == 0x7b || c == 0x5b) {
      const close = c == 0x7b ? 0x7d : 0x5d;
      this.pos++;
      this.ws();
      if (this.peek() == close) {
        this.pos++;
        return true;
      }
      while (true) {
        if (c == 0x7b) {
          this.str();
          if (!this.expect(0x3a)) return false;
        }
        if (!this.skip(depth + 1)) return false;
        this.ws();
        const next = this.peek();
        this.pos++;
        if (next == 0x2c) continue;
        if (next == close) return true;
        return this.fail("malformed JSON");
      }
    }
    if (c < 0) return this.fail("unexpected end of input");
    while (this.pos < this.end) {
      const d = load<u8>(this.pos);
      if (d == 0x2c || d == 0x7d || d == 0x5d || d == 0x20 || d == 0x0a || d == 0x0d || d == 0x09) break;
      this.pos++;
    }
    return true;
  }

  batch(): bool {
    if (!this.expect(0x5b)) return false;
    this.ws();
    if (this.peek() == 0x5d) return true;
    let index = 0;
    while (true) {
      if (!this.envelope(index)) return false;
      index++;
      this.ws();
      const next = this.peek();
      this.pos++;
      if (next == 0x2c) continue;
      if (next == 0x5d) return true;
      return this.fail("malformed batch array");
    }
  }

  envelope(index: i32): bool {
    if (!this.expect(0x7b)) return false;
    let deviceId = "";
    // Field values are collected first: "payload" may come before "device_id".
    const keys: string[] = [];
    const values: f64[] = [];
    this.ws();
    if (this.peek() == 0x7d) {
      this.pos++;
    } else {
      while (true) {
        const key = this.str();
        if (!this.expect(0x3a)) return false;
        this.ws();
        if (key == "device_id" && this.peek() == QUOTE) {
          deviceId = this.str();
        } else if (key == "payload" && this.peek() == 0x7b) {
          if (!this.payload(keys, values)) return false;
        } else if (!this.skip(0)) {
          return false;
        }
        this.ws();
        const next = this.peek();
        this.pos++;
        if (next == 0x2c) continue;
        if (next == 0x7d) break;
        return this.fail("malformed envelope");
      }
    }
    if (!this.devices.has(deviceId)) {
      this.devices.set(deviceId, new DeviceStats());
      this.order.push(deviceId);
    }
    const device = this.devices.get(deviceId);
    device.count += 1;
    device.lastIndex = index;
    for (let i = 0; i < keys.length; i++) device.add(keys[i], values[i]);
    return true;
  }

  payload(keys: string[], values: f64[]): bool {
    this.pos++; // '{'
    this.ws();
    if (this.peek() == 0x7d) {
      this.pos++;
      return true;
    }
    while (true) {
      const key = this.str();
      if (!this.expect(0x3a)) return false;
      this.ws();
      const c = this.peek();
      const start = this.pos;
      if (!this.skip(0)) return false;
      if (c == 0x2d || (c >= 0x30 && c <= 0x39)) {
        const value = parseFloat(String.UTF8.decodeUnsafe(start, this.pos - start));
        if (isFinite(value)) {
          keys.push(key);
          values.push(value);
        }
      }
      this.ws();
      const next = this.peek();
      this.pos++;
      if (next == 0x2c) continue;
      if (next == 0x7d) return true;
      return this.fail("malformed payload");
    }
  }
}
