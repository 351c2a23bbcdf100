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
// Cost is linear in the batch and small per message: the scanner works on globals and raw
// memory (no garbage-collected object, string or shadow-stack frame per message), device
// ids and field names are compared as bytes of the input, numbers are read and written by
// hand, and the output goes into one buffer that grows by doubling.
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

export function on_batch(ptr: usize, len: u32): i64 {
  outLen = 0;
  deviceCount = 0;
  fieldCount = 0;
  if (slotCap == 0) growSlots(256);
  memory.fill(slots, 0, <usize>slotCap << 2);
  error = 0;
  pos = ptr;
  end = ptr + <usize>len;
  if (batch()) {
    render();
  } else {
    outLen = 0;
    writeAscii('{"error":"');
    writeAscii(ERRORS[error]);
    writeAscii('"}');
  }
  return (<i64>out << 32) | <i64>outLen;
}

// Called by the AssemblyScript runtime on a failed assertion: trap, the host recycles us.
function abortHandler(message: string | null, file: string | null, line: u32, column: u32): void {
  unreachable();
}

// ---- tables in raw memory -------------------------------------------------------------------

// Names and ids are byte ranges of the input, valid for the whole call; they keep their JSON
// escapes, so they can be echoed between quotes.
@unmanaged class Device {
  idPtr: usize;
  idLen: i32;
  hash: u32;
  count: i32;
  lastIndex: i32;
  firstField: i32; // index into the field table, -1 = none; fields chain through Field.next
  lastField: i32;
}

@unmanaged class Field {
  keyPtr: usize;
  keyLen: i32;
  count: i32;
  next: i32;
  min: f64;
  max: f64;
  sum: f64;
  last: f64;
}

let devices: usize = 0;
let deviceCount: i32 = 0;
let deviceCap: i32 = 0;
let fields: usize = 0;
let fieldCount: i32 = 0;
let fieldCap: i32 = 0;
// Open addressing: slot = device index + 1 (0 = empty); slotCap is a power of two.
let slots: usize = 0;
let slotCap: i32 = 0;

@inline function device(i: i32): Device {
  return changetype<Device>(devices + <usize>i * offsetof<Device>());
}

@inline function field(i: i32): Field {
  return changetype<Field>(fields + <usize>i * offsetof<Field>());
}

function grow(ptr: usize, cap: i32, size: usize): usize {
  const bytes = <usize>cap * size;
  return ptr == 0 ? heap.alloc(bytes) : heap.realloc(ptr, bytes);
}

function growSlots(cap: i32): void {
  if (slots != 0) heap.free(slots);
  slots = heap.alloc(<usize>cap << 2);
  slotCap = cap;
  memory.fill(slots, 0, <usize>cap << 2);
  for (let i = 0; i < deviceCount; i++) place(device(i).hash, i);
}

function place(hash: u32, index: i32): void {
  const mask = <u32>slotCap - 1;
  let slot = hash & mask;
  while (load<i32>(slots + (<usize>slot << 2)) != 0) slot = (slot + 1) & mask;
  store<i32>(slots + (<usize>slot << 2), index + 1);
}

function sameBytes(a: usize, aLen: i32, b: usize, bLen: i32): bool {
  return aLen == bLen && memory.compare(a, b, <usize>aLen) == 0;
}

function findDevice(idPtr: usize, idLen: i32): i32 {
  let hash: u32 = 2166136261;
  for (let i = 0; i < idLen; i++) hash = (hash ^ <u32>load<u8>(idPtr + <usize>i)) * 16777619;
  const mask = <u32>slotCap - 1;
  let slot = hash & mask;
  while (true) {
    const entry = load<i32>(slots + (<usize>slot << 2));
    if (entry == 0) break;
    const d = device(entry - 1);
    if (d.hash == hash && sameBytes(d.idPtr, d.idLen, idPtr, idLen)) return entry - 1;
    slot = (slot + 1) & mask;
  }
  if (deviceCount == deviceCap) {
    deviceCap = max(64, deviceCap * 2);
    devices = grow(devices, deviceCap, offsetof<Device>());
  }
  const index = deviceCount++;
  const d = device(index);
  d.idPtr = idPtr;
  d.idLen = idLen;
  d.hash = hash;
  d.count = 0;
  d.lastIndex = 0;
  d.firstField = -1;
  d.lastField = -1;
  if (deviceCount * 2 > slotCap) growSlots(slotCap * 2);
  else place(hash, index);
  return index;
}

function addValue(d: Device, keyPtr: usize, keyLen: i32, value: f64): void {
  let i = d.firstField;
  while (i >= 0) {
    const f = field(i);
    if (sameBytes(f.keyPtr, f.keyLen, keyPtr, keyLen)) {
      f.count += 1;
      if (value < f.min) f.min = value;
      if (value > f.max) f.max = value;
      f.sum += value;
      f.last = value;
      return;
    }
    i = f.next;
  }
  if (fieldCount == fieldCap) {
    fieldCap = max(256, fieldCap * 2);
    fields = grow(fields, fieldCap, offsetof<Field>());
  }
  const index = fieldCount++;
  const f = field(index);
  f.keyPtr = keyPtr;
  f.keyLen = keyLen;
  f.count = 1;
  f.next = -1;
  f.min = value;
  f.max = value;
  f.sum = value;
  f.last = value;
  if (d.lastField < 0) d.firstField = index;
  else field(d.lastField).next = index;
  d.lastField = index;
}

// ---- the output buffer --------------------------------------------------------------------

// Unmanaged memory that outlives the call, as the ABI asks: the output stays valid until the
// host calls into the instance again.
let out: usize = 0;
let outCap: usize = 0;
let outLen: usize = 0;

function reserve(extra: usize): void {
  const need = outLen + extra;
  if (need <= outCap) return;
  let cap = max<usize>(outCap * 2, 4096);
  while (cap < need) cap *= 2;
  out = out == 0 ? heap.alloc(cap) : heap.realloc(out, cap);
  outCap = cap;
}

@inline function writeByte(c: i32): void {
  reserve(1);
  store<u8>(out + outLen, <u8>c);
  outLen += 1;
}

function writeBytes(src: usize, n: usize): void {
  reserve(n);
  memory.copy(out + outLen, src, n);
  outLen += n;
}

function writeAscii(s: string): void {
  const n = <usize>s.length;
  reserve(n);
  const src = changetype<usize>(s);
  for (let i: usize = 0; i < n; i++) store<u8>(out + outLen + i, load<u16>(src + (i << 1)));
  outLen += n;
}

function writeInteger(value: u64): void {
  reserve(20);
  let digits: usize = 1;
  for (let rest = value / 10; rest != 0; rest /= 10) digits++;
  for (let i = digits; i > 0; i--) {
    store<u8>(out + outLen + i - 1, <u8>(0x30 + <i32>(value % 10)));
    value /= 10;
  }
  outLen += digits;
}

// A number rounded to 3 decimals, written without a trailing ".0"; null if not finite.
function writeNumber(value: f64): void {
  if (!isFinite(value)) {
    writeAscii("null");
    return;
  }
  const milli = Math.round(value * 1000);
  if (Math.abs(milli) >= 9e15) {
    // Beyond exact integers: the runtime's general (slower) formatting.
    const rounded = milli / 1000;
    writeAscii(rounded == Math.floor(rounded) && Math.abs(rounded) < 1e15
      ? (<i64>rounded).toString()
      : rounded.toString());
    return;
  }
  let units = <i64>milli;
  if (units < 0) {
    writeByte(0x2d);
    units = -units;
  }
  writeInteger(<u64>(units / 1000));
  let frac = <i32>(units % 1000);
  if (frac == 0) return;
  writeByte(0x2e);
  let scale = 100;
  while (frac % 10 == 0) {
    frac /= 10;
    scale /= 10;
  }
  for (; scale > 0; scale /= 10) writeByte(0x30 + (frac / scale) % 10);
}

function render(): void {
  writeByte(0x5b);
  for (let i = 0; i < deviceCount; i++) {
    const d = device(i);
    if (i > 0) writeByte(0x2c);
    writeAscii('{"index":');
    writeInteger(<u64>d.lastIndex);
    writeAscii(',"payload":{"device_id":');
    if (d.idLen > 0) {
      writeByte(0x22);
      writeBytes(d.idPtr, <usize>d.idLen);
      writeByte(0x22);
    } else {
      writeAscii("null");
    }
    writeAscii(',"count":');
    writeInteger(<u64>d.count);
    writeAscii(',"fields":{');
    for (let j = d.firstField; j >= 0; j = field(j).next) {
      const f = field(j);
      if (j != d.firstField) writeByte(0x2c);
      writeByte(0x22);
      writeBytes(f.keyPtr, <usize>f.keyLen);
      writeAscii('":{"count":');
      writeInteger(<u64>f.count);
      writeAscii(',"min":');
      writeNumber(f.min);
      writeAscii(',"max":');
      writeNumber(f.max);
      writeAscii(',"mean":');
      writeNumber(f.sum / <f64>f.count);
      writeAscii(',"last":');
      writeNumber(f.last);
      writeByte(0x7d);
    }
    writeAscii("}}}");
  }
  writeByte(0x5d);
}

// ---- numbers ------------------------------------------------------------------------------

// Powers of ten that are exact in f64: mantissa / 10^k with both exact rounds correctly.
const EXACT_POWERS: StaticArray<f64> = [
  1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11,
  1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22,
];

@inline function isDigit(c: u32): bool {
  return c - 0x30 < 10;
}

// The JSON number in [start, stop), or NaN when it is not one (the caller skips NaN and
// infinities). Up to 19 significant digits are kept, more than an f64 holds.
function readNumber(start: usize, stop: usize): f64 {
  let p = start;
  const negative = load<u8>(p) == 0x2d;
  if (negative) p++;
  let mantissa: u64 = 0;
  let digits = 0;
  let exponent = 0;
  const first = p;
  while (p < stop && isDigit(load<u8>(p))) {
    if (digits < 19) {
      mantissa = mantissa * 10 + <u64>(load<u8>(p) - 0x30);
      if (mantissa != 0) digits++;
    } else {
      exponent++;
    }
    p++;
  }
  if (p == first) return NaN;
  if (p < stop && load<u8>(p) == 0x2e) {
    p++;
    const fraction = p;
    while (p < stop && isDigit(load<u8>(p))) {
      if (digits < 19) {
        mantissa = mantissa * 10 + <u64>(load<u8>(p) - 0x30);
        if (mantissa != 0) digits++;
        exponent--;
      }
      p++;
    }
    if (p == fraction) return NaN;
  }
  if (p < stop && (load<u8>(p) | 0x20) == 0x65) {
    p++;
    let sign = 1;
    if (p < stop && (load<u8>(p) == 0x2b || load<u8>(p) == 0x2d)) {
      if (load<u8>(p) == 0x2d) sign = -1;
      p++;
    }
    const digitsAt = p;
    let e = 0;
    while (p < stop && isDigit(load<u8>(p))) {
      if (e < 100000) e = e * 10 + <i32>(load<u8>(p) - 0x30);
      p++;
    }
    if (p == digitsAt) return NaN;
    exponent += sign * e;
  }
  if (p != stop) return NaN;
  let value: f64 = 0;
  if (mantissa == 0) {
    value = 0;
  } else if (mantissa < (<u64>1 << 53) && exponent >= -22 && exponent <= 22) {
    value = exponent < 0
      ? <f64>mantissa / unchecked(EXACT_POWERS[-exponent])
      : <f64>mantissa * unchecked(EXACT_POWERS[exponent]);
  } else {
    value = <f64>mantissa * Math.pow(10, <f64>exponent);
  }
  return negative ? -value : value;
}

// ---- a small JSON scanner over linear memory ----------------------------------------------

const QUOTE: u32 = 0x22;
const BACKSLASH: u32 = 0x5c;

const ERRORS: StaticArray<string> = [
  "",
  "expected a JSON array of envelopes",
  "expected an envelope object",
  "expected a string",
  "unterminated string",
  "expected ':'",
  "nesting too deep",
  "unexpected end of input",
  "malformed JSON",
  "malformed batch array",
  "malformed envelope",
  "malformed payload",
];

let pos: usize = 0;
let end: usize = 0;
let error: i32 = 0; // index into ERRORS; the first failure wins
// The last string read: its bytes in the input (escapes kept).
let strPtr: usize = 0;
let strLen: i32 = 0;

function fail(code: i32): bool {
  if (error == 0) error = code;
  return false;
}

@inline function peek(): i32 {
  return pos < end ? <i32>load<u8>(pos) : -1;
}

function ws(): void {
  while (pos < end) {
    const c = load<u8>(pos);
    if (c != 0x20 && c != 0x09 && c != 0x0a && c != 0x0d) break;
    pos++;
  }
}

// A string: its contents' byte range goes to strPtr/strLen; false when malformed.
function readString(): bool {
  ws();
  if (peek() != QUOTE) return fail(3);
  const start = ++pos;
  while (pos < end) {
    const c = <u32>load<u8>(pos);
    if (c == QUOTE) {
      strPtr = start;
      strLen = <i32>(pos - start);
      pos++;
      return true;
    }
    pos += c == BACKSLASH ? 2 : 1;
  }
  return fail(4);
}

function colon(): bool {
  ws();
  if (peek() != 0x3a) return fail(5);
  pos++;
  ws();
  return true;
}

// Skip any value.
function skip(depth: i32): bool {
  if (depth > 64) return fail(6);
  ws();
  const c = peek();
  if (c == QUOTE) return readString();
  if (c == 0x7b || c == 0x5b) {
    const close = c == 0x7b ? 0x7d : 0x5d;
    pos++;
    ws();
    if (peek() == close) {
      pos++;
      return true;
    }
    while (true) {
      if (c == 0x7b && !(readString() && colon())) return false;
      if (!skip(depth + 1)) return false;
      ws();
      const next = peek();
      pos++;
      if (next == 0x2c) continue;
      if (next == close) return true;
      return fail(8);
    }
  }
  if (c < 0) return fail(7);
  while (pos < end) {
    const d = load<u8>(pos);
    if (d == 0x2c || d == 0x7d || d == 0x5d || d == 0x20 || d == 0x0a || d == 0x0d || d == 0x09) break;
    pos++;
  }
  return true;
}

function batch(): bool {
  ws();
  if (peek() != 0x5b) return fail(1);
  pos++;
  ws();
  if (peek() == 0x5d) return true;
  let index = 0;
  while (true) {
    if (!envelope(index)) return false;
    index++;
    ws();
    const next = peek();
    pos++;
    if (next == 0x2c) continue;
    if (next == 0x5d) return true;
    return fail(9);
  }
}

// The envelope keys the scanner looks for, as bytes.
const DEVICE_ID = memory.data<u8>([0x64, 0x65, 0x76, 0x69, 0x63, 0x65, 0x5f, 0x69, 0x64]);
const PAYLOAD = memory.data<u8>([0x70, 0x61, 0x79, 0x6c, 0x6f, 0x61, 0x64]);

function envelope(index: i32): bool {
  ws();
  if (peek() != 0x7b) return fail(2);
  pos++;
  let idPtr: usize = 0;
  let idLen = 0;
  // The payload's byte range: "payload" may come before "device_id".
  let payloadStart: usize = 0;
  let payloadEnd: usize = 0;
  ws();
  if (peek() == 0x7d) {
    pos++;
  } else {
    while (true) {
      if (!(readString() && colon())) return false;
      if (sameBytes(strPtr, strLen, DEVICE_ID, 9) && peek() == QUOTE) {
        if (!readString()) return false;
        idPtr = strPtr;
        idLen = strLen;
      } else if (sameBytes(strPtr, strLen, PAYLOAD, 7) && peek() == 0x7b) {
        payloadStart = pos;
        if (!skip(0)) return false;
        payloadEnd = pos;
      } else if (!skip(0)) {
        return false;
      }
      ws();
      const next = peek();
      pos++;
      if (next == 0x2c) continue;
      if (next == 0x7d) break;
      return fail(10);
    }
  }
  const d = device(findDevice(idPtr, idLen));
  d.count += 1;
  d.lastIndex = index;
  if (payloadEnd > payloadStart) {
    const resume = pos;
    const stop = end;
    pos = payloadStart;
    end = payloadEnd;
    const ok = payload(d);
    pos = resume;
    end = stop;
    if (!ok) return false;
  }
  return true;
}

function payload(d: Device): bool {
  pos++; // '{'
  ws();
  if (peek() == 0x7d) {
    pos++;
    return true;
  }
  while (true) {
    if (!(readString() && colon())) return false;
    const keyPtr = strPtr;
    const keyLen = strLen;
    const c = peek();
    const start = pos;
    if (!skip(0)) return false;
    if (c == 0x2d || (c >= 0x30 && c <= 0x39)) {
      const value = readNumber(start, pos);
      if (isFinite(value)) addValue(d, keyPtr, keyLen, value);
    }
    ws();
    const next = peek();
    pos++;
    if (next == 0x2c) continue;
    if (next == 0x7d) return true;
    return fail(11);
  }
}
