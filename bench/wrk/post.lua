-- POST one fixed body to every request and print the run as one JSON line.
--
-- The body and its Content-Type come from the environment (BENCH_BODY: a file path,
-- BENCH_CONTENT_TYPE), so one script serves multipart, raw image, V2 JSON and V2 binary bodies
-- alike. BENCH_HEADERS, when set, holds more request headers, one "Name: value" per line (the
-- V2 binary extension's Inference-Header-Content-Length).
-- wrk counts only socket errors and statuses >= 400 by itself; the response hook counts every
-- non-2xx status. Latencies are in microseconds.

local body_file = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
wrk.method = "POST"
wrk.body = body_file:read("*a")
body_file:close()
wrk.headers["Content-Type"] = os.getenv("BENCH_CONTENT_TYPE")
for line in (os.getenv("BENCH_HEADERS") or ""):gmatch("[^\n]+") do
    local name, value = line:match("^%s*([^:%s]+)%s*:%s*(.-)%s*$")
    assert(name, "BENCH_HEADERS: not a 'Name: value' line: " .. line)
    wrk.headers[name] = value
end

local threads = {}

function setup(thread)
    table.insert(threads, thread)
end

function init(args)
    non2xx = 0
    last_bad_status = 0
end

function response(status, headers, body)
    if status < 200 or status > 299 then
        non2xx = non2xx + 1
        last_bad_status = status
    end
end

function done(summary, latency, requests)
    local non2xx_total, bad_status = 0, 0
    for _, thread in ipairs(threads) do
        non2xx_total = non2xx_total + thread:get("non2xx")
        bad_status = math.max(bad_status, thread:get("last_bad_status"))
    end
    local e = summary.errors
    io.write(string.format(
        'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "non2xx": %d, ' ..
        '"last_bad_status": %d, "connect_errors": %d, "read_errors": %d, "write_errors": %d, ' ..
        '"timeouts": %d, "latency_us": {"min": %d, "mean": %.1f, "max": %d, "p50": %d, ' ..
        '"p90": %d, "p99": %d}}\n',
        summary.requests, summary.duration, summary.bytes, non2xx_total, bad_status,
        e.connect, e.read, e.write, e.timeout, latency.min, latency.mean, latency.max,
        latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end
