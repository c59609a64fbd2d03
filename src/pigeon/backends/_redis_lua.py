"""The Lua scripts of the redis:// backend: every rule that touches more than one key.

# Strategy: one queue is a handful of keys in one hash slot (``{NAME}`` on a Cluster), and
# every change that spans them is one script, so it is atomic for every consumer of every
# process and lands in the AOF (and on the replicas) as one transaction.

Keys of the queue whose stream is ``BASE`` (``pigeon:NAME``, ``pigeon:{NAME}`` on a
Cluster); a script gets ``BASE`` (and its dead-letter queue's) as KEYS and derives the rest,
all in the same slot:

``BASE``                   the stream of priority 0 (the only one a queue without priorities has)
``BASE:pN``                the stream of priority N (1-9), made by the first put with N
``BASE:meta``              maxsize, lease, shutdown, ``p`` (the priorities in use), ``seq``
``BASE[:pN]:leases``       when each delivery's lease ends (ms, Redis's clock)
``BASE[:pN]:released``     deliveries given back by a nack, until taken again
``BASE:delayed``           messages put with a delay: score = due (ms), member =
                           MessagePack ``[seq, priority, expiry, headers, payload, put]``
                           (``put``: ms, Redis's clock; absent in older members)
``BASE:expiry``            messages with a ttl in a stream: score = expiry (ms) - for one
                           held past it, its lease's end -, member = their id (below)
``BASE:dedup:ID``          a dedup id, until the window passes

A message's id is its stream entry's id (``1700000000000-0``) at priority 0 and
``N:1700000000000-0`` at priority N. Entry fields: ``d`` payload, ``h`` headers
(MessagePack), ``x`` expiry (ms, Redis's clock) for a ttl; dead letters add ``origin`` and
``reason``.

Order of a take (``_FETCH``): first due delayed messages move to their stream and expired
ones go to ``NAME.dead`` (``collect``); then, priority 9 down to 0: deliveries given back
or whose lease ended (a nack keeps its priority), then new entries - so a higher priority
always wins within one call, and within one priority a message given back comes before
every message put after it.
"""

from __future__ import annotations

from pigeon.options import DEFAULT_LEASE

__all__ = [
    "ADOPT",
    "APPEND",
    "DEAD",
    "FETCH",
    "LEASE",
    "LEAVE",
    "MOVE",
    "PEEK",
    "PURGE",
    "PUT",
    "PUT_OPTIONS",
    "QSIZE",
    "RELEASE",
    "SETTLE",
    "SHUTDOWN",
    "WIPE",
]

DEFAULT_LEASE_MS = int(DEFAULT_LEASE * 1000)
COLLECT_BUDGET = 256  # delayed moves and expiries per script call (more: the next call)
FETCH_BUDGET = 1000  # entries a take looks at per call, expired or delivered

# Helpers every script starts with.
_PRELUDE = """
local G = 'pigeon'
local function now_ms()
    local t = redis.call('TIME')
    return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function lkey(base, p)
    if p == 0 then return base end
    return base .. ':p' .. p
end
local function qid(p, id)
    if p == 0 then return id end
    return p .. ':' .. id
end
local function split(q)
    local p, id = string.match(q, '^(%d):(.+)$')
    if p then return tonumber(p), id end
    return 0, q
end
local function in_use(base)
    return redis.call('HGET', base .. ':meta', 'p') or ''
end
-- the priorities in use at base, highest first (0 always)
local function levels(base)
    local s, out = in_use(base), {}
    for p = 9, 1, -1 do
        if string.find(s, tostring(p), 1, true) then out[#out + 1] = p end
    end
    out[#out + 1] = 0
    return out
end
-- make priority p's stream and consumer group (priority 0's: the handle's set-up)
local function ensure(base, p)
    if p == 0 then return end
    local s = in_use(base)
    if not string.find(s, tostring(p), 1, true) then
        redis.pcall('XGROUP', 'CREATE', lkey(base, p), G, '0', 'MKSTREAM')
        redis.call('HSET', base .. ':meta', 'p', s .. p)
    end
end
-- messages in the queue: in its streams (held ones too) and delayed
local function total(base)
    local n = redis.call('ZCARD', base .. ':delayed')
    for _, p in ipairs(levels(base)) do n = n + redis.call('XLEN', lkey(base, p)) end
    return n
end
local function tomap(f)
    local m = {}
    for i = 1, #f, 2 do m[f[i]] = f[i + 1] end
    return m
end
local function fields(d, h, x)
    local f = {'d', d}
    if h and h ~= '' then f[#f + 1] = 'h'; f[#f + 1] = h end
    if x and x ~= '' and x ~= 0 then f[#f + 1] = 'x'; f[#f + 1] = x end
    return f
end
-- a dead letter, at its priority, in the dead-letter queue at dead
local function bury(dead, p, d, h, origin, reason)
    ensure(dead, p)
    local f = {'d', d, 'origin', origin, 'reason', reason}
    if h and h ~= '' then f[7] = 'h'; f[8] = h end
    redis.call('XADD', lkey(dead, p), '*', unpack(f))
end
-- whether consumer c still holds entry id of stream L as the delivery it got as its
-- n-th (XACK, XCLAIM and the lease sets look at no owner, so every settle asks here
-- first): 1 it does, 0 the entry is no longer pending (settled, dead-lettered, expired,
-- deleted), -1 it is pending as another delivery (its lease ran out and a consumer, maybe
-- the same one, took it again)
local function holds(L, id, c, n)
    local pe = redis.call('XPENDING', L, G, id, id, 1)
    if not pe[1] then return 0 end
    if pe[1][2] == c and tonumber(pe[1][4]) == tonumber(n) then return 1 end
    return -1
end
-- forget entry id of stream L: acked, deleted, no lease
local function drop(L, id)
    redis.call('XACK', L, G, id)
    redis.call('XDEL', L, id)
    redis.call('ZREM', L .. ':leases', id)
    redis.call('ZREM', L .. ':released', id)
end
-- an expired message: to the dead letters, or dropped in a dead-letter queue (there is
-- no NAME.dead.dead)
local function expire(Q, p, d, h)
    if not Q.is_dead then bury(Q.dead, p, d, h, Q.name, 'expired') end
end
-- due delayed messages to their stream, expired waiting ones to the dead letters (one
-- held by a consumer does not expire while it is: it is looked at again when its lease
-- ends); true if there may be more of either
local function collect(Q, budget)
    local base, now = Q.base, Q.now
    local due = redis.call('ZRANGEBYSCORE', base .. ':delayed', '-inf', now, 'LIMIT', 0, budget)
    for _, m in ipairs(due) do
        redis.call('ZREM', base .. ':delayed', m)
        local t = cmsgpack.unpack(m)
        local p, x, h, d = t[2], t[3], t[4], t[5]
        if x > 0 and x <= now then
            expire(Q, p, d, h)
        else
            ensure(base, p)
            local id = redis.call('XADD', lkey(base, p), '*', unpack(fields(d, h, x)))
            if x > 0 then redis.call('ZADD', base .. ':expiry', x, qid(p, id)) end
        end
    end
    local gone = redis.call('ZRANGEBYSCORE', base .. ':expiry', '-inf', now, 'LIMIT', 0, budget)
    for _, q in ipairs(gone) do
        local p, id = split(q)
        local L = lkey(base, p)
        local later = nil  -- held: look again when its lease ends
        if not redis.call('ZSCORE', L .. ':released', id) then  -- given back: waiting
            local pe = redis.call('XPENDING', L, G, id, id, 1)
            if pe[1] then
                local ends = tonumber(redis.call('ZSCORE', L .. ':leases', id) or '')
                if not ends then  -- read, never recorded: back after the queue's lease
                    local ms = redis.call('HGET', base .. ':meta', 'lease') or DEFAULT_LEASE_MS
                    later = now + tonumber(ms) - pe[1][3]
                elseif ends > now then
                    later = ends
                end
            end
        end
        if later and later > now then
            redis.call('ZADD', base .. ':expiry', later, q)
        else  -- waiting (new, given back, or its lease ended) past its ttl
            redis.call('ZREM', base .. ':expiry', q)
            local e = redis.call('XRANGE', L, id, id)
            if e[1] then
                local f = tomap(e[1][2])
                expire(Q, p, f.d, f.h)
                drop(L, id)
            end
        end
    end
    return #due == budget or #gone == budget
end
"""

_PRELUDE = _PRELUDE.replace("DEFAULT_LEASE_MS", str(DEFAULT_LEASE_MS))

# Put without options. KEYS: base, meta; ARGV: payloads.
PUT = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[2], 'shutdown') == '1' then return 'SHUTDOWN' end
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize') or '0')
if maxsize > 0 and total(KEYS[1]) + #ARGV > maxsize then return 'FULL' end
for i = 1, #ARGV do redis.call('XADD', KEYS[1], '*', 'd', ARGV[i]) end
return 'OK'
"""
)

# A put with options. KEYS: base, meta, then (with dedup ids) one dedup key per payload.
# ARGV: the dedup window in ms ('' without dedup ids; '0': no new id is remembered), the
# headers in MessagePack ('' for none), delay ms, ttl ms (0: none), priority, then the
# payloads. A payload whose dedup key exists (put within the window, whatever became of
# it since) is confirmed and not stored; the keys expire on Redis's clock, and so do
# delays and ttls.
PUT_OPTIONS = (
    _PRELUDE
    + """
if redis.call('HGET', KEYS[2], 'shutdown') == '1' then return 'SHUTDOWN' end
local base, n = KEYS[1], #ARGV - 5
local maxsize = tonumber(redis.call('HGET', KEYS[2], 'maxsize') or '0')
if maxsize > 0 and total(base) + n > maxsize then return 'FULL' end
local delay, ttl, p = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local now, x = 0, 0
if delay > 0 or ttl > 0 then now = now_ms() end
if ttl > 0 then x = now + delay + ttl end  -- a ttl counts after the delay
ensure(base, p)
local function first(i)  -- not a repeat of an id remembered within its window
    if ARGV[1] == '' then return true end
    if ARGV[1] == '0' then return redis.call('EXISTS', KEYS[i + 2]) == 0 end
    return redis.call('SET', KEYS[i + 2], '1', 'NX', 'PX', ARGV[1])
end
for i = 1, n do
    if first(i) then
        local d = ARGV[i + 5]
        if delay > 0 then
            local seq = redis.call('HINCRBY', KEYS[2], 'seq', 1)
            local m = cmsgpack.pack({seq, p, x, ARGV[2], d, now})  -- now: its age (peek)
            redis.call('ZADD', base .. ':delayed', now + delay, m)
        else
            local id = redis.call('XADD', lkey(base, p), '*', unpack(fields(d, ARGV[2], x)))
            if x > 0 then redis.call('ZADD', base .. ':expiry', x, qid(p, id)) end
        end
    end
end
return 'OK'
"""
)

# Take up to n messages. KEYS: base, dead. ARGV: consumer, n, take ('1': acked and deleted
# at once, the plain get; '0': held, with a lease), lease ms ('' for the queue's), the
# default lease ms, max_deliveries, the queue's name, '1' if it is a dead-letter queue,
# '1' to look for deliveries without a lease record (read by a blocked take, or by an
# older client, that died before recording it), and for a dead-letter queue its origin's base
# and name ('' otherwise: reading NAME.dead collects NAME's expired messages first).
# Returns {entries, drained and shut down (0/1), ms until the next message comes due (-1:
# none known), more (0/1: work left, do not wait), the priorities in use (a blocked take
# waits on their streams)}; entries: flat [id, delivery count, payload, headers, expiry,
# ...].
FETCH = (
    _PRELUDE
    + f"""
local now = now_ms()
local Q = {{base = KEYS[1], dead = KEYS[2], name = ARGV[7], is_dead = ARGV[8] == '1', now = now}}
local more = false
if ARGV[10] ~= '' then
    local O = {{base = ARGV[10], dead = KEYS[1], name = ARGV[11], is_dead = false, now = now}}
    more = collect(O, {COLLECT_BUDGET})
end
more = collect(Q, {COLLECT_BUDGET}) or more
local n, take, maxd = tonumber(ARGV[2]), ARGV[3] == '1', tonumber(ARGV[6])
local queue_lease = tonumber(redis.call('HGET', Q.base .. ':meta', 'lease') or ARGV[5])
local lease = tonumber(ARGV[4]) or queue_lease
local out, got, budget = {{}}, 0, {FETCH_BUDGET}

-- new entries just read (fresh = true) are settled in bulk per stream (flush)
local done, leased = {{}}, {{}}
local function flush(L)
    for i = 1, #done, 500 do
        local ids = {{unpack(done, i, math.min(i + 499, #done))}}
        redis.call('XACK', L, G, unpack(ids))
        redis.call('XDEL', L, unpack(ids))
    end
    for i = 1, #leased, 500 do
        redis.call('ZADD', L .. ':leases', unpack(leased, i, math.min(i + 499, #leased)))
    end
    done, leased = {{}}, {{}}
end

local function deliver(L, p, id, count, f, fresh)
    local q = qid(p, id)
    if not f.d then drop(L, id); return end
    local x = tonumber(f.x or '')
    -- held, it stays in the expiry index (collect looks at it when its lease ends)
    if x and (take or x <= now or count > maxd) then redis.call('ZREM', Q.base .. ':expiry', q) end
    if x and x <= now then
        expire(Q, p, f.d, f.h)
        drop(L, id)
        return
    end
    if count > maxd then
        bury(Q.dead, p, f.d, f.h, Q.name, 'max_deliveries')
        drop(L, id)
        return
    end
    if fresh then  -- no lease record to clear
        if take then
            done[#done + 1] = id
        else
            leased[#leased + 1] = now + lease
            leased[#leased + 1] = id
        end
    elseif take then
        drop(L, id)
    else
        redis.call('ZADD', L .. ':leases', now + lease, id)
        redis.call('ZREM', L .. ':released', id)
    end
    got = got + 1
    out[#out + 1] = q
    out[#out + 1] = count
    out[#out + 1] = f.d
    out[#out + 1] = f.h or ''
    out[#out + 1] = f.x or ''
end

local function claim(L, p, id)
    budget = budget - 1
    local c = redis.call('XCLAIM', L, G, ARGV[1], 0, id)
    redis.call('ZREM', L .. ':released', id)
    if #c == 0 or not c[1] or not c[1][2] then  -- deleted meanwhile
        redis.call('ZREM', L .. ':leases', id)
        redis.call('XACK', L, G, id)
        return
    end
    local pe = redis.call('XPENDING', L, G, id, id, 1)
    deliver(L, p, id, pe[1] and pe[1][4] or 1, tomap(c[1][2]), false)
end

local lv = levels(Q.base)
for _, p in ipairs(lv) do
    if got >= n or budget <= 0 then break end
    local L = lkey(Q.base, p)
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', L .. ':leases', '-inf', now,
                                   'LIMIT', 0, n - got)) do
        claim(L, p, id)
    end
    if ARGV[9] == '1' and got < n then
        for _, e in ipairs(redis.call('XPENDING', L, G, 'IDLE', queue_lease, '-', '+', n - got)) do
            if got >= n then break end
            if not redis.call('ZSCORE', L .. ':leases', e[1]) then claim(L, p, e[1]) end
        end
    end
    while got < n and budget > 0 do
        local res = redis.call('XREADGROUP', 'GROUP', G, ARGV[1], 'COUNT', n - got,
                               'STREAMS', L, '>')
        if not res then break end
        for _, e in ipairs(res[1][2]) do
            budget = budget - 1
            if e[2] then deliver(L, p, e[1], 1, tomap(e[2]), true) else drop(L, e[1]) end
        end
    end
    flush(L)
end
if budget <= 0 then more = true end
if got > 0 then return {{out, 0, -1, more and 1 or 0, lv}} end

local shut = 0
if redis.call('HGET', Q.base .. ':meta', 'shutdown') == '1' and total(Q.base) == 0 then
    shut = 1
end
local due = -1
local function sooner(key)
    local z = redis.call('ZRANGE', key, 0, 0, 'WITHSCORES')
    if z[2] then
        local s = tonumber(z[2])
        if due < 0 or s < due then due = s end
    end
end
sooner(Q.base .. ':delayed')
for _, p in ipairs(lv) do sooner(lkey(Q.base, p) .. ':leases') end
if ARGV[10] ~= '' then
    sooner(ARGV[10] .. ':delayed')
    sooner(ARGV[10] .. ':expiry')
end
if due >= 0 then due = math.max(0, due - now) end
return {{out, shut, due, more and 1 or 0, lv}}
"""
)

# Entries a blocked take read (XREADGROUP BLOCK, outside a script: Redis serves each new
# entry to one waiting reader) made deliveries like FETCH's: the first n of them (the
# caller sends them highest priority first) get their lease, or with take are acked and
# deleted; an expired one goes to the dead letters; the rest are given back unharmed
# (delivery count 0, claimable at once). A reader that dies before this script leaves
# its entries without a lease: FETCH's scan for them gives them back after the queue's
# lease. KEYS: base, dead. ARGV: consumer, n, take, lease ms ('' for the queue's), the
# default lease ms, the queue's name, '1' for a dead-letter queue, then (id, expiry or '',
# or 'gone' for an entry deleted before it was read) pairs. Returns one flag per entry:
# 1 delivered, 0 not.
ADOPT = (
    _PRELUDE
    + """
local now = now_ms()
local Q = {base = KEYS[1], dead = KEYS[2], name = ARGV[6], is_dead = ARGV[7] == '1', now = now}
local n, take = tonumber(ARGV[2]), ARGV[3] == '1'
local lease = tonumber(ARGV[4])
if not lease then lease = tonumber(redis.call('HGET', Q.base .. ':meta', 'lease') or ARGV[5]) end
local out, got = {}, 0
for i = 8, #ARGV, 2 do
    local q, x = ARGV[i], tonumber(ARGV[i + 1])
    local p, id = split(q)
    local L = lkey(Q.base, p)
    local ok = 0
    if x and (take or x <= now) then redis.call('ZREM', Q.base .. ':expiry', q) end
    if ARGV[i + 1] == 'gone' then
        drop(L, id)
    elseif x and x <= now then
        local e = redis.call('XRANGE', L, id, id)
        if e[1] then
            local f = tomap(e[1][2])
            expire(Q, p, f.d, f.h)
        end
        drop(L, id)
    elseif got >= n then
        redis.call('XCLAIM', L, G, ARGV[1], 0, id, 'RETRYCOUNT', 0, 'JUSTID')
        redis.call('ZADD', L .. ':leases', now, id)
        redis.call('ZADD', L .. ':released', now, id)
    else
        if take then drop(L, id) else redis.call('ZADD', L .. ':leases', now + lease, id) end
        got = got + 1
        ok = 1
    end
    out[#out + 1] = ok
end
return out
"""
)


# When the leases of deliveries end: ARGV[1] ms from now ('' for the queue's lease, ARGV[2]
# by default), ARGV[3] the consumer that holds them, then (id, delivery count) pairs, each
# changed only if that delivery still holds it (``holds``). KEYS: base. Redis's own clock,
# so clients need not agree. Returns ``holds``'s answer per pair.
LEASE = (
    _PRELUDE
    + """
local now = now_ms()
local ms = tonumber(ARGV[1])
if not ms then ms = tonumber(redis.call('HGET', KEYS[1] .. ':meta', 'lease') or ARGV[2]) end
local out = {}
for i = 4, #ARGV, 2 do
    local p, id = split(ARGV[i])
    local L = lkey(KEYS[1], p)
    local held = holds(L, id, ARGV[3], ARGV[i + 1])
    if held == 1 then redis.call('ZADD', L .. ':leases', now + ms, id) end
    out[#out + 1] = held
end
return out
"""
)

# A handle closes: what its consumer holds is due at once (handed to a shared consumer
# name, so the entries stay claimable) and the consumer leaves the group.
# KEYS: base; ARGV: consumer, orphans.
LEAVE = (
    _PRELUDE
    + """
local now, n = now_ms(), 0
for _, p in ipairs(levels(KEYS[1])) do
    local L = lkey(KEYS[1], p)
    for _, e in ipairs(redis.call('XPENDING', L, G, '-', '+', 10000, ARGV[1])) do
        redis.call('XCLAIM', L, G, ARGV[2], 0, e[1], 'JUSTID')
        redis.call('ZADD', L .. ':leases', now, e[1])
        n = n + 1
    end
    if #redis.call('XPENDING', L, G, '-', '+', 1, ARGV[1]) == 0 then
        redis.call('XGROUP', 'DELCONSUMER', L, G, ARGV[1])
    end
end
return n
"""
)

# Settle (ack) one delivery. KEYS base; ARGV id, the consumer that holds it, its delivery
# count. Acked only if that delivery still holds it: returns ``holds``'s answer.
SETTLE = (
    _PRELUDE
    + """
local p, id = split(ARGV[1])
local L = lkey(KEYS[1], p)
local held = holds(L, id, ARGV[2], ARGV[3])
if held == 1 then
    drop(L, id)
    redis.call('ZREM', KEYS[1] .. ':expiry', ARGV[1])
end
return held
"""
)

# A delivery given back (nack with requeue): claimable ARGV[1] ms from now, and counted as
# waiting (qsize), not held, until it is taken again; with a ttl (ARGV[5], its expiry in
# ms, or '') it may expire while it waits. KEYS base; ARGV ms, id, the consumer that holds
# it, its delivery count, expiry. Given back only if that delivery still holds it: returns
# ``holds``'s answer.
RELEASE = (
    _PRELUDE
    + """
local due = now_ms() + tonumber(ARGV[1])
local p, id = split(ARGV[2])
local L = lkey(KEYS[1], p)
local held = holds(L, id, ARGV[3], ARGV[4])
if held == 1 then
    redis.call('ZADD', L .. ':leases', due, id)
    redis.call('ZADD', L .. ':released', due, id)
    if ARGV[5] ~= '' then redis.call('ZADD', KEYS[1] .. ':expiry', ARGV[5], ARGV[2]) end
end
return held
"""
)

# Where the messages are. KEYS base, dead; ARGV the queue's name, '1' for a dead-letter
# queue, its origin's base and name ('' otherwise). Expired and due messages are collected
# first. Returns {waiting: in a stream and not held by a consumer - new, given back (due or
# not), or whose lease ended - plus delayed; every message: held ones too}.
QSIZE = (
    _PRELUDE
    + f"""
local now = now_ms()
if ARGV[3] ~= '' then
    collect({{base = ARGV[3], dead = KEYS[1], name = ARGV[4], is_dead = false, now = now}},
            {COLLECT_BUDGET})
end
collect({{base = KEYS[1], dead = KEYS[2], name = ARGV[1], is_dead = ARGV[2] == '1', now = now}},
        {COLLECT_BUDGET})
local delayed = redis.call('ZCARD', KEYS[1] .. ':delayed')
local waiting, all = delayed, delayed
for _, p in ipairs(levels(KEYS[1])) do
    local L = lkey(KEYS[1], p)
    local len = redis.call('XLEN', L)
    local free = redis.call('ZCOUNT', L .. ':leases', '-inf', now)
    free = free + redis.call('ZCOUNT', L .. ':released', '(' .. now, '+inf')
    local held = math.max(0, redis.call('XPENDING', L, G)[1] - free)
    waiting = waiting + math.max(0, len - held)
    all = all + len
end
return {{waiting, all}}
"""
)

# Dead-letter one delivery: KEYS base, dead; ARGV id, payload, origin, reason, headers
# (''), the consumer that holds it, its delivery count. Only if that delivery still holds
# it: returns ``holds``'s answer.
DEAD = (
    _PRELUDE
    + """
local p, id = split(ARGV[1])
local L = lkey(KEYS[1], p)
local held = holds(L, id, ARGV[6], ARGV[7])
if held == 1 then
    bury(KEYS[2], p, ARGV[2], ARGV[5], ARGV[3], ARGV[4])
    drop(L, id)
    redis.call('ZREM', KEYS[1] .. ':expiry', ARGV[1])
end
return held
"""
)

# Messages back at the tail of their priority (taken for a caller that failed), the first
# ARGV[1] of them to the dead letters instead (origin ARGV[2], reason "undecodable").
# KEYS base, dead; ARGV[3..]: (priority, payload, headers or '', expiry or '') per message.
APPEND = (
    _PRELUDE
    + """
local dead, n = tonumber(ARGV[1]), 0
for i = 3, #ARGV, 4 do
    n = n + 1
    local p, d, h, x = tonumber(ARGV[i]), ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
    if n <= dead then
        bury(KEYS[2], p, d, h, ARGV[2], 'undecodable')
    else
        ensure(KEYS[1], p)
        local id = redis.call('XADD', lkey(KEYS[1], p), '*', unpack(fields(d, h, x)))
        if x ~= '' then redis.call('ZADD', KEYS[1] .. ':expiry', x, qid(p, id)) end
    end
end
return n
"""
)

# Shut down: KEYS base; ARGV immediate ('1': the waiting messages are dropped, delayed too).
SHUTDOWN = (
    _PRELUDE
    + """
redis.call('HSET', KEYS[1] .. ':meta', 'shutdown', 1)
if ARGV[1] == '1' then
    for _, p in ipairs(levels(KEYS[1])) do redis.call('XTRIM', lkey(KEYS[1], p), 'MAXLEN', 0) end
    redis.call('DEL', KEYS[1] .. ':delayed', KEYS[1] .. ':expiry')
end
return 1
"""
)


# Administration (``pigeon peek | purge | delete | move``). A message *waits* when a take
# would deliver it now: new (after the group's last delivered id), given back or whose
# lease ended; delayed ones (``BASE:delayed``, and given back with a delay: released, due
# later) wait too, with a due time. Held ones (a lease running) do not.
_WAITING = """
local function idms(id) return tonumber(string.match(id, '^(%d+)')) end
-- the id after which entries of stream L are new (never delivered to the group)
local function last_delivered(L)
    for _, g in ipairs(redis.call('XINFO', 'GROUPS', L)) do
        local m = tomap(g)
        if m.name == G then return m['last-delivered-id'] end
    end
    return '0-0'
end
-- visit(L, p, id, fields, deliveries, pending): the waiting entries of base's streams
-- that a take would deliver now, priority 9 down to 0 (given back first, then new, as a
-- take reads them); stops when visit returns false or after budget entries
local function each_waiting(base, now, budget, visit)
    for _, p in ipairs(levels(base)) do
        local L = lkey(base, p)
        if redis.call('EXISTS', L) == 1 then
            for _, id in ipairs(redis.call('ZRANGEBYSCORE', L .. ':leases', '-inf', now,
                                           'LIMIT', 0, budget)) do
                local e = redis.call('XRANGE', L, id, id)
                if e[1] then
                    local pe = redis.call('XPENDING', L, G, id, id, 1)
                    local n = pe[1] and pe[1][4] or 0
                    if not visit(L, p, id, tomap(e[1][2]), n, true) then return false end
                end
            end
            local after = last_delivered(L)
            for _, e in ipairs(redis.call('XRANGE', L, '(' .. after, '+', 'COUNT', budget)) do
                if not visit(L, p, e[1], tomap(e[2]), 0, false) then return false end
            end
        end
    end
    return true
end
"""

# Up to ARGV[1] waiting messages as they are, taking nothing (read only): KEYS base;
# ARGV n, reply budget in bytes (at least one message is shown). Returns flat [id,
# deliveries, payload, headers, origin, reason, age ms, due ms (-1: due now)] per message:
# those a take would deliver now in that order, then the delayed ones by due time.
PEEK = (
    _PRELUDE
    + _WAITING
    + """
local now, base = now_ms(), KEYS[1]
local n, room = tonumber(ARGV[1]), tonumber(ARGV[2])
local out, shown = {}, 0
local function show(q, count, f, put, due)
    if shown >= n or (room < 0 and shown > 0) then return false end
    shown = shown + 1
    room = room - #f.d - #(f.h or '') - #(f.origin or '') - #(f.reason or '') - 64
    local age = put and math.max(0, now - put) or 0
    for _, v in ipairs({q, count, f.d, f.h or '', f.origin or '', f.reason or '', age, due}) do
        out[#out + 1] = v
    end
    return true
end
each_waiting(base, now, n, function(L, p, id, f, count)
    if not f.d then return true end
    return show(qid(p, id), count, f, idms(id), -1)
end)
-- delayed: put with a delay, or given back with one
local later = {}
for _, m in ipairs(redis.call('ZRANGE', base .. ':delayed', 0, n - 1, 'WITHSCORES')) do
    later[#later + 1] = m
end
local rows = {}
for i = 1, #later, 2 do
    local t = cmsgpack.unpack(later[i])
    rows[#rows + 1] = {tonumber(later[i + 1]), 'delayed-' .. t[1], 0,
                       {d = t[5], h = t[4]}, t[6]}
end
for _, p in ipairs(levels(base)) do
    local L = lkey(base, p)
    local r = redis.call('ZRANGEBYSCORE', L .. ':released', '(' .. now, '+inf', 'WITHSCORES',
                         'LIMIT', 0, n)
    for i = 1, #r, 2 do
        local e = redis.call('XRANGE', L, r[i], r[i])
        if e[1] then
            local pe = redis.call('XPENDING', L, G, r[i], r[i], 1)
            rows[#rows + 1] = {tonumber(r[i + 1]), qid(p, r[i]), pe[1] and pe[1][4] or 0,
                               tomap(e[1][2]), idms(r[i])}
        end
    end
end
table.sort(rows, function(a, b) return a[1] < b[1] end)
for _, r in ipairs(rows) do
    if not r[4].d or not show(r[2], r[3], r[4], r[5], r[1] - now) then break end
end
return out
"""
)

# Drop up to ARGV[1] waiting messages (held ones stay), delayed ones included. KEYS base.
# Returns {dropped, more (0/1)}.
PURGE = (
    _PRELUDE
    + _WAITING
    + """
local now, base, budget = now_ms(), KEYS[1], tonumber(ARGV[1])
local n = 0
local done = each_waiting(base, now, budget, function(L, p, id)
    drop(L, id)
    redis.call('ZREM', base .. ':expiry', qid(p, id))
    n = n + 1
    return n < budget
end)
for _, p in ipairs(levels(base)) do  -- given back with a delay
    local L = lkey(base, p)
    for _, id in ipairs(redis.call('ZRANGEBYSCORE', L .. ':released', '(' .. now, '+inf',
                                   'LIMIT', 0, budget)) do
        drop(L, id)
        redis.call('ZREM', base .. ':expiry', qid(p, id))
        n = n + 1
    end
end
local delayed = redis.call('ZCARD', base .. ':delayed')
redis.call('DEL', base .. ':delayed')
n = n + delayed
return {n, (done and 0) or 1}
"""
)

# Delete the queue at base: every key of it but its dedup ids (the caller scans for
# those), messages held by consumers too. KEYS base. Returns how many messages it held.
WIPE = (
    _PRELUDE
    + """
local base = KEYS[1]
local n = total(base)
for _, p in ipairs(levels(base)) do
    local L = lkey(base, p)
    redis.call('DEL', L, L .. ':leases', L .. ':released')
end
redis.call('DEL', base .. ':meta', base .. ':delayed', base .. ':expiry')
return n
"""
)

# Move up to ARGV[1] messages a take would deliver now from the queue at KEYS[1] to the
# tail of the one at KEYS[2] (same server; on a Cluster, same hash slot), each with its
# priority and headers and a fresh delivery count (no ttl, origin or reason), as many as
# the target has room for. Returns {moved, more (0/1)}, or 'SHUTDOWN' (target shut down).
MOVE = (
    _PRELUDE
    + _WAITING
    + """
local now, src, dst, budget = now_ms(), KEYS[1], KEYS[2], tonumber(ARGV[1])
if redis.call('HGET', dst .. ':meta', 'shutdown') == '1' then return 'SHUTDOWN' end
local maxsize = tonumber(redis.call('HGET', dst .. ':meta', 'maxsize') or '0')
local room = maxsize > 0 and math.max(0, maxsize - total(dst)) or -1
local n = 0
local done = each_waiting(src, now, budget, function(L, p, id, f)
    if n >= budget or room == 0 then return false end
    if f.d then
        ensure(dst, p)
        redis.call('XADD', lkey(dst, p), '*', unpack(fields(f.d, f.h)))
        n = n + 1
        if room > 0 then room = room - 1 end
    end
    drop(L, id)
    redis.call('ZREM', src .. ':expiry', qid(p, id))
    return true
end)
return {n, (done and room ~= 0) and 0 or 1}
"""
)
