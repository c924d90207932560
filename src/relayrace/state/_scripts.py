"""The Lua scripts that change the shared state in Redis: each change is one script, so each is
atomic on the server, and each publishes what it changed on the prefix's channel.

Messages are JSON objects ``{"k": kind, "f": field, "v": value}`` (a bench's also ``"i"``, the
instance that wrote it), or a JSON array of them
(what one ``BATCH`` published); the kinds are ``bench``, ``unbench``, ``fails``, ``probe``,
``unprobe``, ``usage``, ``limits`` and ``pin``.
The merge rule for benches is ``_model.merge_bench``, written again here in Lua.
"""

from __future__ import annotations

import attrs


@attrs.frozen
class Keys:
    """The keys under one ``prefix`` (``{prefix}:bench`` ...: the braces are Redis Cluster's
    hash tag, so that every key of a prefix is in one slot and one script may name them all).
    Hashes are keyed by ``Deployment.field`` (pins by their affinity key). The channel is
    ``prefix:events`` (channels have no slot)."""

    prefix: str

    @property
    def _tag(self) -> str:
        return "{" + self.prefix + "}"

    @property
    def channel(self) -> str:
        return f"{self.prefix}:events"

    @property
    def bench(self) -> str:
        return f"{self._tag}:bench"

    @property
    def fails(self) -> str:
        return f"{self._tag}:fails"

    @property
    def limits(self) -> str:
        return f"{self._tag}:limits"

    @property
    def pins(self) -> str:
        return f"{self._tag}:pins"

    def probe(self, field: str) -> str:
        return f"{self._tag}:probe:{field}"

    def usage(self, minute: int) -> tuple[str, str]:
        return f"{self._tag}:rpm:{minute}", f"{self._tag}:tpm:{minute}"

    def retry(self, index: int) -> str:
        return f"{self._tag}:retry:{index}"

    @property
    def instances(self) -> str:
        return f"{self._tag}:instances"


# KEYS: bench hash. ARGV: field, record (JSON: until, reason, manual), now, channel, the
# writing instance (its message says who wrote it: that instance skips its own echo).
BENCH = """
local field, now = ARGV[1], tonumber(ARGV[3])
local new = cjson.decode(ARGV[2])
local cur = redis.call('HGET', KEYS[1], field)
if cur then
  local old = cjson.decode(cur)
  if old.manual or old['until'] > now then
    local winner
    if old.manual ~= new.manual then
      if old.manual then winner = old else winner = new end
    elseif old['until'] > new['until'] then winner = old else winner = new end
    new = {['until'] = math.max(old['until'], new['until']), reason = winner.reason,
           manual = old.manual or new.manual}
  end
end
local encoded = cjson.encode(new)
redis.call('HSET', KEYS[1], field, encoded)
redis.call('PUBLISH', ARGV[4], cjson.encode({k = 'bench', f = field, v = new, i = ARGV[5]}))
return encoded
"""

# KEYS: bench hash. ARGV: field, manual ('1' lifts a manual bench too), channel.
UNBENCH = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if not cur then return 0 end
if cjson.decode(cur).manual and ARGV[2] ~= '1' then return 0 end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({k = 'unbench', f = ARGV[1]}))
return 1
"""

# KEYS: fails hash. ARGV: channel, then per deployment: field, reset ('1': a success came
# first), failures counted after it, the threshold its sender benches at ('0': none). One
# process's changes since its last report, in one call. A count already at the threshold
# before these failures is not announced: more failures decide nothing (every instance
# benches at the threshold, and was told when the count reached it); a reset always is.
FAILS = """
for i = 2, #ARGV, 4 do
  local field, n, limit = ARGV[i], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local reset, count = ARGV[i + 1] == '1', 0
  if reset then redis.call('HDEL', KEYS[1], field) end
  if n > 0 then count = redis.call('HINCRBY', KEYS[1], field, n) end
  if reset or limit == 0 or count - n < limit then
    redis.call('PUBLISH', ARGV[1], cjson.encode({k = 'fails', f = field, v = count}))
  end
end
return 1
"""

# KEYS: the probe key. ARGV: holder, ttl (ms), field, channel, now.
PROBE = """
local ok = redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])
if not ok then
  if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
local lease = {holder = ARGV[1], ['until'] = tonumber(ARGV[5]) + tonumber(ARGV[2]) / 1000}
redis.call('PUBLISH', ARGV[4], cjson.encode({k = 'probe', f = ARGV[3], v = lease}))
return 1
"""

# KEYS: the probe key. ARGV: holder, field, channel.
UNPROBE = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[1])
redis.call('PUBLISH', ARGV[3], cjson.encode({k = 'unprobe', f = ARGV[2]}))
return 1
"""

# KEYS: the retry window's slices, oldest first (the last is the current one).
# ARGV: requests to add, retries spent elsewhere to add, tokens wanted, ratio, floor, ttl (ms).
# Grants at most what keeps retries <= floor + ratio * requests over the window, and counts
# what it grants as spent at once (so N instances together stay within the bound).
RETRY = """
local current = KEYS[#KEYS]
redis.call('HINCRBY', current, 'req', ARGV[1])
redis.call('HINCRBY', current, 'ret', ARGV[2])
redis.call('PEXPIRE', current, ARGV[6])
local requests, retries = 0, 0
for i = 1, #KEYS do
  local v = redis.call('HMGET', KEYS[i], 'req', 'ret')
  requests = requests + (tonumber(v[1]) or 0)
  retries = retries + (tonumber(v[2]) or 0)
end
local room = math.floor(tonumber(ARGV[5]) + tonumber(ARGV[4]) * requests - retries)
local grant = math.min(tonumber(ARGV[3]), math.max(0, room))
if grant > 0 then redis.call('HINCRBY', current, 'ret', grant) end
return grant
"""

# KEYS: this minute's rpm hash, tpm hash. ARGV: field, requests, tokens, channel, minute, ttl (ms).
USAGE = """
local r = redis.call('HINCRBY', KEYS[1], ARGV[1], ARGV[2])
local t = redis.call('HINCRBY', KEYS[2], ARGV[1], ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[6])
redis.call('PEXPIRE', KEYS[2], ARGV[6])
local usage = {minute = tonumber(ARGV[5]), requests = r, tokens = t}
redis.call('PUBLISH', ARGV[4], cjson.encode({k = 'usage', f = ARGV[1], v = usage}))
return r
"""

# KEYS: limits hash. ARGV: field, limits (JSON, with observed_at), channel. The newer wins.
LIMITS = """
local new = cjson.decode(ARGV[2])
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and cjson.decode(cur).observed_at > new.observed_at then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({k = 'limits', f = ARGV[1], v = new}))
return 1
"""

# KEYS: pins hash. ARGV: affinity key, pin (JSON: f, until), channel.
PIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({k = 'pin', f = ARGV[1], v = cjson.decode(ARGV[2])}))
return 1
"""

# KEYS: bench, fails, limits, pins, this minute's rpm, tpm, instances. ARGV: now, this
# instance, the time it counts as live until. One consistent read of everything (the backstop
# behind pub/sub); forgets expired benches and pins on the way; renews this instance in the
# instances hash (id -> live until), forgets the expired, and returns how many are live.
SNAPSHOT = """
local now = tonumber(ARGV[1])
local function prune(key)
  local all = redis.call('HGETALL', key)
  local kept = {}
  for i = 1, #all, 2 do
    local v = cjson.decode(all[i + 1])
    if v.manual or v['until'] > now then
      kept[#kept + 1] = all[i]; kept[#kept + 1] = all[i + 1]
    else
      redis.call('HDEL', key, all[i])
    end
  end
  return kept
end
redis.call('HSET', KEYS[7], ARGV[2], ARGV[3])
local live, seen = 0, redis.call('HGETALL', KEYS[7])
for i = 1, #seen, 2 do
  if tonumber(seen[i + 1]) > now then live = live + 1 else redis.call('HDEL', KEYS[7], seen[i]) end
end
return {prune(KEYS[1]), redis.call('HGETALL', KEYS[2]), redis.call('HGETALL', KEYS[3]),
        prune(KEYS[4]), redis.call('HGETALL', KEYS[5]), redis.call('HGETALL', KEYS[6]), live}
"""


#: The scripts a writer turn may send together in one ``BATCH`` call (``PROBE`` is awaited on
#: its own, ``SNAPSHOT`` is a read).
BATCHED = {
    "bench": BENCH,
    "unbench": UNBENCH,
    "fails": FAILS,
    "unprobe": UNPROBE,
    "retry": RETRY,
    "usage": USAGE,
    "limits": LIMITS,
    "pin": PIN,
}

# KEYS: every operation's keys, in order. ARGV: the number of operations, then per operation:
# its script's name, its number of keys, its number of arguments, its arguments. Runs each
# operation as its own script would (each still publishes what it changed) and returns their
# results in order: one round trip for everything a writer turn has, each change still atomic
# (the whole batch is: Redis runs a script to its end before anything else). What the
# operations publish goes out as one message at the end, a JSON array of their messages: one
# message for each other instance to receive and decode instead of one per operation. (It
# does so by shadowing ``redis`` with a local whose ``call`` holds back ``PUBLISH``: the scripts
# above may use ``redis.call`` only.)
BATCH = (
    """
local real, channel, published = redis, nil, {}
local redis = {call = function(command, ...)
  if command ~= 'PUBLISH' then return real.call(command, ...) end
  local to, message = ...
  channel, published[#published + 1] = to, message
  return 0
end}
local run = {}
"""
    + "".join(
        f"run['{name}'] = function(KEYS, ARGV)\n{source.strip()}\nend\n"
        for name, source in BATCHED.items()
    )
    + """
local results, k, a = {}, 1, 2
for i = 1, tonumber(ARGV[1]) do
  local name, nk, na = ARGV[a], tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local keys, args = {}, {}
  for j = 1, nk do keys[j] = KEYS[k + j - 1] end
  for j = 1, na do args[j] = ARGV[a + 2 + j] end
  results[i] = run[name](keys, args)
  k, a = k + nk, a + 3 + na
end
if #published == 1 then
  real.call('PUBLISH', channel, published[1])
elseif channel then
  real.call('PUBLISH', channel, '[' .. table.concat(published, ',') .. ']')
end
return results
"""
)
