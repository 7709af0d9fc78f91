-- PATCH /mod from callers out of step: each connection waits a random
-- time between its reply and its next request (exponential, mean MEAN_MS,
-- in wrk's whole milliseconds, rounded at random so that the mean holds),
-- as API servers charge for their own consumers' requests, which arrive
-- at random.  Credentials PREFIX0 .. PREFIX(N-1) in turn, `by=-1&min=0`.
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_paced.lua URL -- PREFIX N MEAN_MS [SEED]
--
-- The load is the callers' (about connections / (MEAN_MS + latency)), so
-- the figure to read is the latency, not req/s.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   mean_ms = tonumber(args[3] or "3")
   math.randomseed(tonumber(args[4] or "1"))
   reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("PATCH", "/mod?cred=" .. prefix .. (i - 1) .. "&by=-1&min=0")
   end
   count = n
   turn = 0
end

delay = function()
   local ms = -mean_ms * math.log(1 - math.random())
   return math.floor(ms + math.random())
end

request = function()
   turn = turn % count + 1
   return reqs[turn]
end
