-- PATCH /mod charging a funded account picked at random each request:
-- credentials PREFIX0 .. PREFIX(N-1), `by=-1&min=0`, as pgbench's
-- `UPDATE ... WHERE aid = :aid` picks a random row (bench/pg_http.py).  At
-- random, two front-ends' batches rarely share an account, as in service.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_random.lua URL -- PREFIX N [SEED]
--
-- The N requests are formatted once, in init; `request` only picks one.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   math.randomseed(tonumber(args[3] or "1"))
   reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("PATCH", "/mod?cred=" .. prefix .. (i - 1) .. "&by=-1&min=0")
   end
   count = n
end

request = function()
   return reqs[math.random(count)]
end
