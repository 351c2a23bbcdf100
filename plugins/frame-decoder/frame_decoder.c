/*
 * frame-decoder: compact binary sensor frames -> JSON telemetry (flux plugin ABI 1).
 *
 * Like a LoRaWAN payload formatter: a battery-powered sensor sends a few bytes instead of
 * JSON, and the gateway decodes them. Frame layout (big-endian, as most radios send it):
 *
 *   offset size  field
 *   0      1     version: 1 or 2
 *   1      2     temperature, int16, hundredths of a degree Celsius
 *   3      1     relative humidity, uint8, percent (0-100)
 *   4      2     battery, uint16, millivolts
 *   6      1     flags: bit0 motion, bit1 door_open, bit2 low_battery, bit7 button
 *   7      2     (version 2 only) pressure, uint16, tenths of a hectopascal
 *
 * Output (returned, packed pointer/length): [{"payload": {...}}] without a topic, so the host
 * uses the manifest's output_topic, devices/{device_id}/telemetry. A frame that is too short,
 * has an unknown version or an impossible humidity is rejected with {"error": "..."}.
 *
 * Build: clang --target=wasm32 -O2 -nostdlib -Wl,--no-entry (see scripts/build_plugins.sh).
 * No libc: the module needs no imports at all.
 */

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef int i32;
typedef long long i64;

#define EXPORT(name) __attribute__((export_name(name)))
#define WASM_PAGE 65536u

extern u8 __heap_base;

/* Bump allocator. The host allocates its input buffer once and reuses it, so flux_alloc is
 * called only when a larger message arrives; nothing else in this plugin allocates. */
static u32 heap_top = 0;

EXPORT("flux_alloc") u32 flux_alloc(u32 size) {
    if (heap_top == 0) heap_top = (u32)&__heap_base;
    u32 ptr = (heap_top + 7u) & ~7u;
    u32 end = ptr + size;
    if (end < ptr) return 0;
    u32 have = (u32)__builtin_wasm_memory_size(0) * WASM_PAGE;
    if (end > have) {
        u32 pages = (end - have + WASM_PAGE - 1) / WASM_PAGE;
        if (__builtin_wasm_memory_grow(0, pages) == (unsigned long)-1) return 0;
    }
    heap_top = end;
    return ptr;
}

EXPORT("flux_free") void flux_free(u32 ptr, u32 size) {
    /* Bump allocator: only the most recent allocation can be given back. */
    if (ptr + size == heap_top) heap_top = ptr;
}

EXPORT("flux_abi_version") i32 flux_abi_version(void) { return 1; }

/* The output lives in a static buffer: valid until the next call, as the ABI requires. */
static char out[512];
static u32 out_len;

static void put(const char *s) {
    while (*s && out_len < sizeof(out)) out[out_len++] = *s++;
}

static void put_uint(u32 v) {
    char digits[10];
    int n = 0;
    do { digits[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    while (n && out_len < sizeof(out)) out[out_len++] = digits[--n];
}

/* Write value/100 (or /10) as a JSON number without floating point: -1205 -> -12.05. */
static void put_fixed(i32 value, u32 scale, u32 decimals) {
    u32 mag;
    if (value < 0) { put("-"); mag = (u32)(-value); } else { mag = (u32)value; }
    put_uint(mag / scale);
    u32 frac = mag % scale;
    if (frac == 0) return;
    put(".");
    if (decimals == 2 && frac < 10) put("0");
    if (decimals == 2 && frac % 10 == 0) frac /= 10;
    put_uint(frac);
}

static void put_bool(const char *key, int on) {
    put(",\""); put(key); put(on ? "\":true" : "\":false");
}

static i64 finish(void) {
    return (i64)(((u64)(u32)out << 32) | out_len);
}

static i64 reject(const char *why) {
    out_len = 0;
    put("{\"error\":\""); put(why); put("\"}");
    return finish();
}

EXPORT("on_msg") i64 on_msg(const u8 *frame, u32 len) {
    if (len < 7) return reject("frame too short: need at least 7 bytes");
    u8 version = frame[0];
    if (version != 1 && version != 2) return reject("unknown frame version");
    if (version == 2 && len < 9) return reject("version 2 frame too short: need 9 bytes");
    i32 temp = (short)(u16)((frame[1] << 8) | frame[2]);
    u32 humidity = frame[3];
    u32 battery = (u32)((frame[4] << 8) | frame[5]);
    u8 flags = frame[6];
    if (humidity > 100) return reject("humidity above 100 percent");

    out_len = 0;
    put("[{\"payload\":{\"temperature\":"); put_fixed(temp, 100, 2);
    put(",\"humidity\":"); put_uint(humidity);
    put(",\"battery_mv\":"); put_uint(battery);
    if (version == 2) {
        u32 pressure = (u32)((frame[7] << 8) | frame[8]);
        put(",\"pressure_hpa\":"); put_fixed((i32)pressure, 10, 1);
    }
    put_bool("motion", flags & 1);
    put_bool("door_open", flags & 2);
    put_bool("low_battery", flags & 4);
    put_bool("button", flags & 128);
    put(",\"frame_version\":"); put_uint(version);
    put("}}]");
    return finish();
}
