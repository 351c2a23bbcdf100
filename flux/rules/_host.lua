-- flux rules host: loaded once per LuaRuntime with the full standard library, before any rule.
-- Captures what the host needs, hardens the shared string metatable, builds the read-only
-- environment rules run in, and returns the host API (compile, run, state helpers).
local TICK, BUDGET, TIME_LIMIT, MAX_DEVICES, MAX_KEYS, MAX_STATE_STRING, MAX_PATTERN, RULE_CODE,
      METER_SHIFT = ...

local debug_sethook, debug_getinfo, debug_setmetatable = debug.sethook, debug.getinfo, debug.setmetatable
local pcall, error, type, setmetatable, getmetatable, next, pairs, ipairs, select =
      pcall, error, type, setmetatable, getmetatable, next, pairs, ipairs, select
local tostring, tonumber, load, rawlen, rawget, rawset, assert =
      tostring, tonumber, load, rawlen, rawget, rawset, assert
local collectgarbage, clock = collectgarbage, os.clock
local string, math, table, utf8 = string, math, table, utf8
local s_find, s_match, s_gmatch, s_gsub, s_byte = string.find, string.match, string.gmatch, string.gsub, string.byte
local s_rep, s_format, s_sub, s_upper, s_lower, s_reverse, s_char =
      string.rep, string.format, string.sub, string.upper, string.lower, string.reverse, string.char
local t_concat, t_insert, t_remove, t_sort, t_unpack, t_move =
      table.concat, table.insert, table.remove, table.sort, table.unpack, table.move
local u_char, u_codepoint, u_len, u_offset, u_codes = utf8.char, utf8.codepoint, utf8.len, utf8.offset, utf8.codes
local m_log, m_huge, m_min = math.log, math.huge, math.min
local HOST = "=flux-host"

---------------------------------------------------------------------------------------------
-- Budget: instructions (count hook every TICK instructions) plus charged work for C calls,
-- and a CPU-time check once a rule has run long enough to matter.
---------------------------------------------------------------------------------------------
-- METER[1] = rule index * METER_SHIFT + units used by the current evaluation: one write per
-- rule both resets the budget and records which rule runs. METER[2..5] remember when a slow
-- evaluation started (rule base, event index, batch serial, CPU clock).
local METER = {0, false, false, false, 0}
local POS = {0, 0}              -- [1] event index being evaluated
local SITE = {false, false}     -- source and line where the budget ran out
local SERIAL = {0}
local BUDGET_ERR = setmetatable({}, {__metatable = false})
local TIME_ERR = setmetatable({}, {__metatable = false})
local SLOW = 16 * TICK
local m_floor = math.floor

local function where()
  for level = 2, 64 do
    local info = debug_getinfo(level, "Sl")
    if not info then break end
    if info.what ~= "C" and info.source ~= HOST then
      SITE[1], SITE[2] = info.source, info.currentline
      return
    end
  end
  SITE[1], SITE[2] = false, false
end

-- WORK[rule] = budget units (instructions and charged C work) spent in that rule this batch:
-- each hook firing adds its TICK to the rule running then, so a rule's share of the batch's
-- time can be told although rules run fused. The first firing of a batch comes after a random
-- part of TICK (PHASE), so a batch of alike events is not always sampled at the same spot.
local WORK = {}
local PHASE = {0}
local m_random = math.random

local function hook()
  local tick = TICK
  if PHASE[1] > 0 then
    tick = PHASE[1]
    PHASE[1] = 0
    debug_sethook(hook, "", TICK)
  end
  local used = METER[1] + tick
  METER[1] = used
  local rule = used // METER_SHIFT
  WORK[rule] = (WORK[rule] or 0) + tick
  local spent = used % METER_SHIFT
  if spent > BUDGET then where(); error(BUDGET_ERR, 0) end
  if spent >= SLOW then
    local base = used - spent
    if METER[2] ~= base or METER[3] ~= POS[1] or METER[4] ~= SERIAL[1] then
      METER[2], METER[3], METER[4], METER[5] = base, POS[1], SERIAL[1], clock()
    elseif clock() - METER[5] > TIME_LIMIT then
      where(); error(TIME_ERR, 0)
    end
  end
end

local function charge(units)
  if units > BUDGET then where(); error(BUDGET_ERR, 0) end
  units = m_floor(units)
  local used = METER[1] + units
  METER[1] = used
  local rule = used // METER_SHIFT
  WORK[rule] = (WORK[rule] or 0) + units
  if used % METER_SHIFT > BUDGET then where(); error(BUDGET_ERR, 0) end
end

---------------------------------------------------------------------------------------------
-- Charged wrappers for C functions whose cost grows with their input (hooks do not fire
-- inside C). Lua patterns backtrack: a pattern with q variable-length items on an n-byte
-- subject can take ~n^(q+1) steps, so that estimate is charged before the call.
---------------------------------------------------------------------------------------------
local function slen(s)
  local t = type(s)
  if t == "string" then return #s end
  return 24
end

local function pattern_work(s, p, plain, init, unanchorable)
  local n = slen(s)
  if type(p) ~= "string" then return n end
  if #p > MAX_PATTERN then error("pattern is longer than " .. MAX_PATTERN .. " bytes", 3) end
  if plain then return n + #p end
  local q, opt, i, m = 0, 0, 1, #p
  local anchored = (not unanchorable) and s_byte(p, 1) == 94
  while i <= m do
    local c = s_byte(p, i)
    if c == 37 then                                   -- %x, %bxy, %f[set]
      local d = s_byte(p, i + 1)
      if d == 98 then q = q + 1; i = i + 4
      elseif d == 102 then i = i + 2
      else i = i + 2 end
    elseif c == 91 then                               -- [set]
      local j = i + 1
      if s_byte(p, j) == 94 then j = j + 1 end
      if s_byte(p, j) == 93 then j = j + 1 end
      while j <= m do
        local e = s_byte(p, j)
        if e == 37 then j = j + 2
        elseif e == 93 then break
        else j = j + 1 end
      end
      i = j + 1
    elseif c == 42 or c == 43 or c == 45 then q = q + 1; i = i + 1   -- * + -
    elseif c == 63 then opt = opt + 1; i = i + 1                       -- ?
    else i = i + 1 end
  end
  local e = q + (anchored and 0 or 1)
  return (n + 1) ^ e * 2 ^ opt
end

local function w_find(s, p, init, plain)
  charge(pattern_work(s, p, plain, init, false))
  return s_find(s, p, init, plain)
end
local function w_match(s, p, init)
  charge(pattern_work(s, p, false, init, false))
  return s_match(s, p, init)
end
local function w_gmatch(s, p, init)
  charge(pattern_work(s, p, false, init, true))
  return s_gmatch(s, p, init)
end
local function w_gsub(s, p, repl, n)
  local work = pattern_work(s, p, false, nil, false)
  if type(repl) == "string" then work = work + slen(s) * (#repl + 1) end
  charge(work)
  return s_gsub(s, p, repl, n)
end
local function w_rep(s, n, sep)
  if type(n) == "number" and n > 0 then
    charge(n * (slen(s) + (type(sep) == "string" and #sep or 0)))
  end
  return s_rep(s, n, sep)
end
local function w_format(fmt, ...)
  local work = slen(fmt)
  for k = 1, select("#", ...) do work = work + slen((select(k, ...))) end
  charge(work)
  return s_format(fmt, ...)
end
local function linear(f)
  return function(s, ...) charge(slen(s)); return f(s, ...) end
end
local function w_char(...) charge(select("#", ...)); return s_char(...) end
local function tlen(t) if type(t) == "table" then return #t end return 0 end
local function w_concat(t, sep, i, j)
  charge(tlen(t) * (2 + (type(sep) == "string" and #sep or 0)))
  return t_concat(t, sep, i, j)
end
local function w_insert(t, ...) charge(tlen(t)); return t_insert(t, ...) end
local function w_remove(t, ...) charge(tlen(t)); return t_remove(t, ...) end
local function w_sort(t, f)
  local n = tlen(t)
  if n > 1 then charge(n * m_log(n, 2) * 4) end
  return t_sort(t, f)
end
local function w_unpack(t, i, j)
  i = i or 1
  j = j or tlen(t)
  if type(i) == "number" and type(j) == "number" and j >= i then charge(j - i + 1) end
  return t_unpack(t, i, j)
end
local function w_move(a1, f, e, t, a2)
  if type(f) == "number" and type(e) == "number" and e >= f then charge(e - f + 1) end
  return t_move(a1, f, e, t, a2)
end
local function w_u_char(...) charge(select("#", ...)); return u_char(...) end

-- The real string table is what ("x"):method() reaches through the string metatable, so it is
-- edited in place: wrapped costly functions, no dump/pack. Its metatable is hidden.
string.find, string.match, string.gmatch, string.gsub = w_find, w_match, w_gmatch, w_gsub
string.rep, string.format, string.char = w_rep, w_format, w_char
string.sub, string.upper, string.lower, string.reverse, string.byte =
  linear(s_sub), linear(s_upper), linear(s_lower), linear(s_reverse), linear(s_byte)
string.dump, string.pack, string.unpack, string.packsize = nil, nil, nil, nil
getmetatable("").__metatable = false

---------------------------------------------------------------------------------------------
-- Missing fields: nil compares false with anything, indexing nil gives nil and #nil is 0,
-- so `temperature > 30` is simply false when the payload has no temperature.
---------------------------------------------------------------------------------------------
local function readonly_error(what)
  return function(_, key)
    error(what .. " is read-only (tried to set '" .. tostring(key) .. "')", 2)
  end
end
local function always_false() return false end
local EMPTY = setmetatable({}, {__newindex = readonly_error("nil"), __metatable = false})
debug_setmetatable(nil, {
  __index = EMPTY, __lt = always_false, __le = always_false,
  __len = function() return 0 end, __metatable = false,
})

---------------------------------------------------------------------------------------------
-- The environment rules see. E (their _ENV) is empty and rejects writes; reads fall through to
-- V (library proxies and the per-event names) and then to the current payload.
---------------------------------------------------------------------------------------------
local function proxy(name, source, allowed)
  local inner = {}
  for _, key in ipairs(allowed) do inner[key] = source[key] end
  return setmetatable({}, {
    __index = inner, __newindex = readonly_error(name), __metatable = false,
    __pairs = function() return next, inner, nil end,
  })
end

local SAFE_MATH = proxy("math", math, {
  "abs", "ceil", "exp", "floor", "fmod", "huge", "log", "max", "maxinteger", "min",
  "mininteger", "modf", "pi", "sqrt", "sin", "cos", "tan", "asin", "acos", "atan", "tointeger",
  "type", "ult", "random",
})
local SAFE_STRING = proxy("string", string, {
  "byte", "char", "find", "format", "gmatch", "gsub", "len", "lower", "match", "rep", "reverse",
  "sub", "upper",
})
local SAFE_TABLE = proxy("table", {
  concat = w_concat, insert = w_insert, remove = w_remove, sort = w_sort, unpack = w_unpack,
  move = w_move,
}, {"concat", "insert", "remove", "sort", "unpack", "move"})
local SAFE_UTF8 = proxy("utf8", {
  char = w_u_char, charpattern = utf8.charpattern, codepoint = linear(u_codepoint),
  len = linear(u_len), offset = linear(u_offset), codes = linear(u_codes),
}, {"char", "charpattern", "codepoint", "len", "offset", "codes"})

local MSGMT = {__newindex = readonly_error("msg"), __metatable = false}
local MSG = setmetatable({}, MSGMT)
MSGMT.__len = function() return #MSGMT.__index end
MSGMT.__pairs = function() return next, MSGMT.__index, nil end
MSGMT.__index = EMPTY

local VMT = {__index = EMPTY}
local V = setmetatable({
  math = SAFE_MATH, string = SAFE_STRING, table = SAFE_TABLE, utf8 = SAFE_UTF8,
  pairs = pairs, ipairs = ipairs, next = next, select = select, tonumber = tonumber,
  tostring = tostring, type = type, error = error, assert = assert, unpack = w_unpack,
  msg = MSG, _VERSION = _VERSION,
}, VMT)
local E = setmetatable({}, {
  __index = V, __metatable = false,
  __newindex = function(_, key)
    error("cannot assign global '" .. tostring(key) .. "': rules may only set locals (use local " ..
      tostring(key) .. " = ...) or fields of state", 2)
  end,
})

---------------------------------------------------------------------------------------------
-- Per-device state: one bounded table per (rule id, device id); oldest device evicted first.
---------------------------------------------------------------------------------------------
local STATES = {}
-- What changed since the host last handed changes out (``take_state_changes``): state
-- tables written to (DIRTY) and devices evicted (EVICTED), so only they are written back.
local DIRTY, EVICTED = {}, {}
local OWNER = setmetatable({}, {__mode = "k"})   -- state table -> {rule id, device, data}

local function new_state(rule_id, device)
  local data, count = {}, 0
  local st = setmetatable({}, {
    __index = data, __metatable = false,
    __pairs = function() return next, data, nil end,
    __len = function() return #data end,
    __newindex = function(t, key, value)
      local kt, vt = type(key), type(value)
      if kt ~= "string" and kt ~= "number" then error("state keys must be strings or numbers", 2) end
      if vt == "table" or vt == "function" or vt == "thread" or vt == "userdata" then
        error("state values must be numbers, strings or booleans (got " .. vt .. ")", 2)
      end
      if vt == "string" and #value > MAX_STATE_STRING then
        error("state strings are limited to " .. MAX_STATE_STRING .. " bytes", 2)
      end
      if data[key] == nil then
        if value == nil then return end
        if count >= MAX_KEYS then error("state is limited to " .. MAX_KEYS .. " keys per device", 2) end
        count = count + 1
      elseif value == nil then
        count = count - 1
      end
      data[key] = value
      DIRTY[t] = true
    end,
  })
  OWNER[st] = {rule_id, device, data}
  return st
end

local function state_for(rule_id, device)
  if device == nil then device = "" end
  local s = STATES[rule_id]
  if s == nil then
    s = {map = {}, queue = {}, head = 1, tail = 0}
    STATES[rule_id] = s
  end
  local st = s.map[device]
  if st == nil then
    st = new_state(rule_id, device)
    s.map[device] = st
    local tail = s.tail + 1
    s.tail = tail
    s.queue[tail] = device
    if tail - s.head + 1 > MAX_DEVICES then
      local oldest = s.queue[s.head]
      s.queue[s.head] = nil
      s.head = s.head + 1
      local evicted = s.map[oldest]
      s.map[oldest] = nil
      DIRTY[evicted] = nil
      EVICTED[#EVICTED + 1] = {rule_id, oldest}
    end
  end
  return st
end

local function prune_states(keep)
  for rule_id in pairs(STATES) do
    if not keep[rule_id] then STATES[rule_id] = nil end
  end
end

local function drop_state(rule_id) STATES[rule_id] = nil end

-- Load a device's state (from the database, or a rule test's sample) without marking it
-- changed.
local function seed_state(rule_id, device, values)
  local st = state_for(rule_id, device)
  for key, value in next, values do st[key] = value end
  DIRTY[st] = nil
end

-- Whether this host holds ``device``'s state for ``rule_id`` (one seen or loaded).
local function has_state(rule_id, device)
  local s = STATES[rule_id]
  return s ~= nil and s.map[device] ~= nil
end

-- The state changed since the last call, as a list of {rule id, device, data} (data false
-- for an evicted device), and forget it. Rule tests' states (ids from "\0") are left out.
local function take_state_changes()
  local changes = {}
  for st in next, DIRTY do
    local owner = OWNER[st]
    if owner ~= nil and s_byte(owner[1], 1) ~= 0 then
      local copy = {}
      for key, value in next, owner[3] do copy[key] = value end
      changes[#changes + 1] = {owner[1], owner[2], copy}
    end
  end
  for i = 1, #EVICTED do
    local evicted = EVICTED[i]
    if s_byte(evicted[1], 1) ~= 0 then changes[#changes + 1] = {evicted[1], evicted[2], false} end
  end
  DIRTY, EVICTED = {}, {}
  return changes
end

local function state_devices(rule_id)
  local s = STATES[rule_id]
  if s == nil then return 0 end
  return s.tail - s.head + 1
end

---------------------------------------------------------------------------------------------
-- Compiling. Rule sources are always loaded in text mode ("t": bytecode refused) with E.
---------------------------------------------------------------------------------------------
local function compile(source, chunkname)
  local fn, err = load(source, chunkname, "t", E)
  return fn or false, err or false
end

-- A fused group chunk gets the internals it needs as chunk arguments.
local function instantiate(chunk, functions, masks)
  return chunk(V, VMT, MSGMT, METER, POS, state_for, functions, masks, type, E)
end

-- The slow generic group: calls each rule's standalone function (fallback and benchmark).
-- A batch is 5 values per event: payload, topic, device id, received_at, plan id.
local function generic_group(functions, masks, first, last, ids, uses_state, is_when)
  return function(batch, n, from, codes, outputs)
    local matched = #codes
    for i = from, n do
      local base = (i - 1) * 5
      local payload = batch[base + 1]
      local device = batch[base + 3]
      VMT.__index = payload; MSGMT.__index = payload
      V.topic = batch[base + 2]; V.device_id = device; V.received_at = batch[base + 4]
      local mask = masks[batch[base + 5]]
      POS[1] = i; METER[1] = 0
      for rule = first, last do
        if mask[rule] then
          METER[1] = rule * METER_SHIFT
          if uses_state[rule] then V.state = state_for(ids[rule], device) end
          local value = functions[rule]()
          V.state = nil
          if value then
            matched = matched + 1
            codes[matched] = i * RULE_CODE + rule
            if not is_when[rule] and type(value) == "table" then outputs[matched] = value end
          end
        end
      end
    end
    return matched
  end
end

---------------------------------------------------------------------------------------------
-- Running a batch: each group's fused function runs unprotected over the batch; on an error
-- the failing (event, rule) is recorded, the event's remaining rules of that group run one by
-- one (protected), and the fused function resumes at the next event.
---------------------------------------------------------------------------------------------
local function is_undefined(msg)
  if s_find(msg, "attempt to call a nil value", 1, true) then return false end
  return s_find(msg, "a nil value", 1, true) ~= nil or s_find(msg, "got nil", 1, true) ~= nil
      or s_find(msg, "got no value", 1, true) ~= nil
end

local function clear_event()
  VMT.__index = EMPTY; MSGMT.__index = EMPTY
  V.topic = nil; V.device_id = nil; V.received_at = nil; V.state = nil
end

-- Returns, per match, its code (event position * RULE_CODE + rule index) and a script's output
-- table; the failures (6 values each: event position, rule index, kind, message, source, line);
-- per rule, how many when-conditions met an undefined value; the rules quarantined just now;
-- per rule, the budget units it spent (WORK).
local function run(ruleset, batch, n, used_plans)
  local codes, outputs, failures, undefined, quarantined, last_failed = {}, {}, {}, {}, {}, {}
  local functions, masks, consecutive = ruleset.functions, ruleset.masks, ruleset.consecutive
  local quarantine_after, ids = ruleset.quarantine_after, ruleset.ids
  local uses_state, is_when = ruleset.uses_state, ruleset.is_when

  local function applicable(i, rule) return masks[batch[(i - 1) * 5 + 5]][rule] end

  local function failed(i, rule, err)
    local kind, msg, src, line = "runtime", nil, false, false
    if err == BUDGET_ERR then
      kind, msg, src, line = "timeout", "instruction budget exhausted", SITE[1], SITE[2]
    elseif err == TIME_ERR then
      kind, msg, src, line = "timeout", "CPU time limit exceeded", SITE[1], SITE[2]
    elseif type(err) == "string" then
      msg = err
      if s_find(err, "not enough memory", 1, true) then kind = "memory" end
    else
      msg = "error object is a " .. type(err) .. " value"
    end
    if kind == "runtime" and is_when[rule] and is_undefined(msg) then
      undefined[rule] = (undefined[rule] or 0) + 1
      return
    end
    for j = (last_failed[rule] or 0) + 1, i - 1 do
      if applicable(j, rule) then consecutive[rule] = 0; break end
    end
    last_failed[rule] = i
    consecutive[rule] = consecutive[rule] + 1
    local at = #failures
    failures[at + 1], failures[at + 2], failures[at + 3] = i, rule, kind
    failures[at + 4], failures[at + 5], failures[at + 6] = msg, src, line
    if consecutive[rule] >= quarantine_after then
      for _, mask in pairs(masks) do mask[rule] = false end
      quarantined[#quarantined + 1] = rule
    end
  end

  SERIAL[1] = SERIAL[1] + 1
  METER[1] = 0
  WORK = {}
  PHASE[1] = m_random(1, TICK)
  debug_sethook(hook, "", PHASE[1])
  local groups = ruleset.groups
  for g = 1, #groups do
    local group = groups[g]
    local fn, last = group[1], group[3]
    local from = 1
    while from <= n do
      local ok, err = pcall(fn, batch, n, from, codes, outputs)
      local i, rule = POS[1], METER[1] // METER_SHIFT
      METER[1] = 0
      if ok then break end
      V.state = nil
      failed(i, rule, err)
      local device = batch[(i - 1) * 5 + 3]
      for later = rule + 1, last do
        if applicable(i, later) then
          METER[1] = later * METER_SHIFT
          if uses_state[later] then V.state = state_for(ids[later], device) end
          local ok2, value = pcall(functions[later])
          METER[1] = 0
          V.state = nil
          if not ok2 then
            failed(i, later, value)
          elseif value then
            local matched = #codes + 1
            codes[matched] = i * RULE_CODE + later
            if not is_when[later] and type(value) == "table" then outputs[matched] = value end
          end
        end
      end
      from = i + 1
    end
  end
  debug_sethook()
  clear_event()

  -- A rule with an evaluation after its last failure in this batch is no longer failing.
  local seen = {}
  for u = 1, #used_plans do
    for rule, on in pairs(masks[used_plans[u]]) do
      if not seen[rule] then
        seen[rule] = true
        local from = last_failed[rule]
        if from == nil then
          if on then consecutive[rule] = 0 end
        else
          for j = from + 1, n do
            if applicable(j, rule) then consecutive[rule] = 0; break end
          end
        end
      end
    end
  end
  WORK[0] = nil  -- units spent between rules (the event loop itself) are no rule's
  return codes, outputs, failures, undefined, quarantined, WORK
end

local function memory_kib() return collectgarbage("count") end
local function full_gc() collectgarbage("collect"); collectgarbage("collect") end

-- Nothing a rule can reach leads back here; drop the dangerous globals anyway.
python = nil
if package and package.loaded then package.loaded.python = nil end

return {
  compile = compile, instantiate = instantiate, generic_group = generic_group, run = run,
  prune_states = prune_states, state_devices = state_devices, state_for = state_for,
  drop_state = drop_state, seed_state = seed_state, has_state = has_state,
  take_state_changes = take_state_changes,
  memory_kib = memory_kib, full_gc = full_gc,
}
