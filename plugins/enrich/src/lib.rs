//! enrich: adds derived values to temperature/humidity telemetry (flux plugin ABI 1).
//!
//! Input (`input = "json"`): the event's payload, a JSON object. When it has a numeric
//! `temperature` (degrees Celsius) the plugin returns one output: the same object plus
//!
//! * `temperature_f`: degrees Fahrenheit;
//! * `dew_point`: degrees Celsius (Magnus formula), when `humidity` (percent) is present;
//! * `heat_index`: degrees Celsius (US National Weather Service regression), likewise;
//! * `alarms`: a list of `temperature_out_of_range`, `humidity_out_of_range`,
//!   `heat_caution` (heat index >= 32.2 C) and `heat_danger` (>= 39.4 C).
//!
//! A payload without a temperature produces no output. The output has no topic, so it goes
//! to the manifest's `output_topic` (`devices/{device_id}/enriched`).
//!
//! `on_batch` does the same for a batch of envelopes (`[{"topic", "device_id", "payload"},
//! ...]`): one output per event with a temperature, carrying that event's `index`, and
//! `{"index": i, "error": ...}` for an event whose payload `on_msg` would reject.
//!
//! Built with Debian's rustc and its wasm32 standard library (no cargo, no crates):
//! `rustc --target wasm32-unknown-unknown --crate-type cdylib -O src/lib.rs`.

use std::alloc::{alloc, dealloc, Layout};
use std::fmt::Write;

const SENSOR_MIN_C: f64 = -40.0;
const SENSOR_MAX_C: f64 = 85.0;

/// Allocate `size` bytes for the host (its input buffer). Returns 0 when out of memory.
#[no_mangle]
pub extern "C" fn flux_alloc(size: u32) -> u32 {
    match Layout::from_size_align(size.max(1) as usize, 8) {
        Ok(layout) => unsafe { alloc(layout) as u32 },
        Err(_) => 0,
    }
}

/// Free a buffer from `flux_alloc`; the host passes the size it asked for.
#[no_mangle]
pub extern "C" fn flux_free(ptr: u32, size: u32) {
    if ptr != 0 {
        if let Ok(layout) = Layout::from_size_align(size.max(1) as usize, 8) {
            unsafe { dealloc(ptr as *mut u8, layout) }
        }
    }
}

#[no_mangle]
pub extern "C" fn flux_abi_version() -> i32 {
    1
}

/// The output buffer, reused by every call: valid until the next call, as the ABI requires.
static mut OUT: String = String::new();

fn packed(out: &String) -> i64 {
    ((out.as_ptr() as u64) << 32 | out.len() as u64) as i64
}

fn rejected(out: &mut String, why: &str) -> i64 {
    out.clear();
    let _ = write!(out, "{{\"error\":\"{}\"}}", why);
    packed(out)
}

#[no_mangle]
pub extern "C" fn on_msg(ptr: u32, len: u32) -> i64 {
    let input = unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) };
    let out = unsafe { &mut OUT };
    out.clear();
    out.push_str("[{");
    match enrich(input, out) {
        Ok(true) => {
            out.push_str("}]");
            packed(out)
        }
        Ok(false) => 0,
        Err(why) => rejected(out, why),
    }
}

#[no_mangle]
pub extern "C" fn on_batch(ptr: u32, len: u32) -> i64 {
    let input = unsafe { std::slice::from_raw_parts(ptr as *const u8, len as usize) };
    let out = unsafe { &mut OUT };
    out.clear();
    match enrich_batch(input, out) {
        Ok(()) => packed(out),
        Err(why) => rejected(out, why),
    }
}

/// Every envelope's payload through `enrich`, each output tagged with its event's index.
fn enrich_batch(input: &[u8], out: &mut String) -> Result<(), &'static str> {
    let mut p = Parser { s: input, i: 0 };
    p.ws();
    p.expect(b'[')?;
    out.push('[');
    p.ws();
    if p.peek() == Some(b']') {
        out.push(']');
        return Ok(());
    }
    let mut index = 0usize;
    loop {
        p.ws();
        let payload = p.envelope_payload()?;
        let mark = out.len();
        if mark > 1 {
            out.push(',');
        }
        let _ = write!(out, "{{\"index\":{},", index);
        match payload.map(|(start, end)| enrich(&input[start..end], out)) {
            Some(Ok(true)) => out.push('}'),
            Some(Err(why)) => {
                out.truncate(mark);
                if mark > 1 {
                    out.push(',');
                }
                let _ = write!(out, "{{\"index\":{},\"error\":\"{}\"}}", index, why);
            }
            _ => out.truncate(mark),
        }
        index += 1;
        p.ws();
        match p.next() {
            Some(b',') => continue,
            Some(b']') => break,
            _ => return Err("malformed batch array"),
        }
    }
    out.push(']');
    Ok(())
}

struct Reading {
    temperature: Option<f64>,
    humidity: Option<f64>,
    members: usize,
    close: usize,
}

/// Write `"payload":{...}` (the input object plus the derived values) and return true, or
/// write nothing and return false when there is no temperature.
fn enrich(input: &[u8], out: &mut String) -> Result<bool, &'static str> {
    let reading = scan(input)?;
    let t = match reading.temperature {
        Some(t) if t.is_finite() => t,
        _ => return Ok(false),
    };
    // Echo the object up to (not including) its closing brace, then append our fields.
    let body = std::str::from_utf8(&input[..reading.close]).map_err(|_| "payload is not UTF-8")?;
    out.push_str("\"payload\":");
    out.push_str(body);
    if reading.members > 0 {
        out.push(',');
    }
    let _ = write!(out, "\"temperature_f\":{}", round2(t * 9.0 / 5.0 + 32.0));
    let mut alarms: Vec<&str> = Vec::new();
    if !(SENSOR_MIN_C..=SENSOR_MAX_C).contains(&t) {
        alarms.push("temperature_out_of_range");
    }
    if let Some(rh) = reading.humidity {
        if !(0.0..=100.0).contains(&rh) {
            alarms.push("humidity_out_of_range");
        } else {
            if rh > 0.0 {
                let _ = write!(out, ",\"dew_point\":{}", round2(dew_point(t, rh)));
            }
            let hi = heat_index(t, rh);
            let _ = write!(out, ",\"heat_index\":{}", round2(hi));
            if hi >= 39.4 {
                alarms.push("heat_danger");
            } else if hi >= 32.2 {
                alarms.push("heat_caution");
            }
        }
    }
    out.push_str(",\"alarms\":[");
    for (i, alarm) in alarms.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('"');
        out.push_str(alarm);
        out.push('"');
    }
    out.push_str("]}");
    Ok(true)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Dew point in Celsius, Magnus formula with Sonntag's constants (good for -45..60 C).
fn dew_point(t: f64, rh: f64) -> f64 {
    const B: f64 = 17.62;
    const C: f64 = 243.12;
    let gamma = (rh / 100.0).ln() + B * t / (C + t);
    C * gamma / (B - gamma)
}

/// Heat index in Celsius: NWS Rothfusz regression with its low/high humidity adjustments.
fn heat_index(t_c: f64, rh: f64) -> f64 {
    let t = t_c * 9.0 / 5.0 + 32.0;
    let simple = 0.5 * (t + 61.0 + (t - 68.0) * 1.2 + rh * 0.094);
    let hi = if (simple + t) / 2.0 < 80.0 {
        simple
    } else {
        let mut hi = -42.379 + 2.04901523 * t + 10.14333127 * rh
            - 0.22475541 * t * rh
            - 0.00683783 * t * t
            - 0.05481717 * rh * rh
            + 0.00122874 * t * t * rh
            + 0.00085282 * t * rh * rh
            - 0.00000199 * t * t * rh * rh;
        if rh < 13.0 && (80.0..=112.0).contains(&t) {
            hi -= (13.0 - rh) / 4.0 * ((17.0 - (t - 95.0).abs()) / 17.0).sqrt();
        } else if rh > 85.0 && (80.0..=87.0).contains(&t) {
            hi += (rh - 85.0) / 10.0 * ((87.0 - t) / 5.0);
        }
        hi
    };
    (hi - 32.0) * 5.0 / 9.0
}

/// Walk the top-level object: find numeric `temperature` and `humidity`, count members and
/// locate the closing brace. Nested values are skipped, not interpreted.
fn scan(s: &[u8]) -> Result<Reading, &'static str> {
    let mut p = Parser { s, i: 0 };
    let mut reading = Reading { temperature: None, humidity: None, members: 0, close: 0 };
    p.ws();
    p.expect(b'{')?;
    p.ws();
    if p.peek() == Some(b'}') {
        reading.close = p.i;
        return Ok(reading);
    }
    loop {
        p.ws();
        let (start, end) = p.string()?;
        let key = &s[start..end];
        p.ws();
        p.expect(b':')?;
        p.ws();
        let value_start = p.i;
        p.value(0)?;
        let value = &s[value_start..p.i];
        reading.members += 1;
        if key == b"temperature" {
            reading.temperature = number(value);
        } else if key == b"humidity" {
            reading.humidity = number(value);
        }
        p.ws();
        match p.next() {
            Some(b',') => continue,
            Some(b'}') => {
                reading.close = p.i - 1;
                return Ok(reading);
            }
            _ => return Err("payload is not a JSON object"),
        }
    }
}

fn number(value: &[u8]) -> Option<f64> {
    match value.first() {
        Some(b'-') | Some(b'0'..=b'9') => std::str::from_utf8(value).ok()?.parse().ok(),
        _ => None,
    }
}

struct Parser<'a> {
    s: &'a [u8],
    i: usize,
}

impl<'a> Parser<'a> {
    fn peek(&self) -> Option<u8> {
        self.s.get(self.i).copied()
    }
    fn next(&mut self) -> Option<u8> {
        let c = self.peek();
        self.i += 1;
        c
    }
    fn ws(&mut self) {
        while let Some(b' ' | b'\t' | b'\n' | b'\r') = self.peek() {
            self.i += 1;
        }
    }
    fn expect(&mut self, c: u8) -> Result<(), &'static str> {
        if self.next() == Some(c) { Ok(()) } else { Err("payload is not a JSON object") }
    }
    /// A string; returns the byte range of its contents (escapes left as they are).
    fn string(&mut self) -> Result<(usize, usize), &'static str> {
        self.expect(b'"')?;
        let start = self.i;
        loop {
            match self.next() {
                Some(b'"') => return Ok((start, self.i - 1)),
                Some(b'\\') => self.i += 1,
                Some(_) => {}
                None => return Err("unterminated string"),
            }
        }
    }
    /// Scan one batch envelope; return the byte range of its `payload` object, if any.
    fn envelope_payload(&mut self) -> Result<Option<(usize, usize)>, &'static str> {
        self.expect(b'{')?;
        let mut payload = None;
        self.ws();
        if self.peek() == Some(b'}') {
            self.i += 1;
            return Ok(None);
        }
        loop {
            self.ws();
            let (start, end) = self.string()?;
            let is_payload = &self.s[start..end] == b"payload";
            self.ws();
            self.expect(b':')?;
            self.ws();
            let value_start = self.i;
            self.skip_any()?;
            if is_payload && self.s.get(value_start) == Some(&b'{') {
                payload = Some((value_start, self.i));
            }
            self.ws();
            match self.next() {
                Some(b',') => continue,
                Some(b'}') => return Ok(payload),
                _ => return Err("malformed batch envelope"),
            }
        }
    }
    /// Skip one value of any depth, without recursion (`value` limits the depth it reads).
    fn skip_any(&mut self) -> Result<(), &'static str> {
        let mut depth = 0usize;
        loop {
            match self.peek() {
                Some(b'"') => {
                    self.string()?;
                }
                Some(b'{' | b'[') => {
                    depth += 1;
                    self.i += 1;
                }
                Some(b'}' | b']') => {
                    if depth == 0 {
                        return Err("malformed JSON");
                    }
                    depth -= 1;
                    self.i += 1;
                }
                Some(b',' | b':' | b' ' | b'\t' | b'\n' | b'\r') if depth > 0 => self.i += 1,
                Some(_) => {
                    let start = self.i;
                    while let Some(c) = self.peek() {
                        if matches!(c, b',' | b'}' | b']' | b':' | b' ' | b'\t' | b'\n' | b'\r') {
                            break;
                        }
                        self.i += 1;
                    }
                    if self.i == start {
                        return Err("malformed JSON");
                    }
                }
                None => return Err("malformed JSON"),
            }
            if depth == 0 {
                return Ok(());
            }
        }
    }
    fn value(&mut self, depth: u32) -> Result<(), &'static str> {
        if depth > 64 {
            return Err("payload nests too deeply");
        }
        match self.peek() {
            Some(b'"') => self.string().map(|_| ()),
            Some(open @ (b'{' | b'[')) => {
                let close = if open == b'{' { b'}' } else { b']' };
                self.i += 1;
                self.ws();
                if self.peek() == Some(close) {
                    self.i += 1;
                    return Ok(());
                }
                loop {
                    self.ws();
                    if open == b'{' {
                        self.string()?;
                        self.ws();
                        self.expect(b':')?;
                        self.ws();
                    }
                    self.value(depth + 1)?;
                    self.ws();
                    match self.next() {
                        Some(b',') => continue,
                        Some(c) if c == close => return Ok(()),
                        _ => return Err("malformed JSON"),
                    }
                }
            }
            Some(_) => {
                while let Some(c) = self.peek() {
                    if matches!(c, b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r') {
                        break;
                    }
                    self.i += 1;
                }
                Ok(())
            }
            None => Err("malformed JSON"),
        }
    }
}
