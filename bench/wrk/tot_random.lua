-- GET /tot of a funded account picked at random each request: credentials
-- PREFIX0 .. PREFIX(N-1), as `pgbench -S` reads a random row
-- (bench/pg_http.py).
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/tot_random.lua URL -- PREFIX N [SEED]
--
-- The N requests are formatted once, in init; `request` only picks one.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   math.randomseed(tonumber(args[3] or "1"))
   reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("GET", "/tot?cred=" .. prefix .. (i - 1))
   end
   count = n
end

request = function()
   return reqs[math.random(count)]
end
