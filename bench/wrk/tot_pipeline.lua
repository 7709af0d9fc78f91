-- GET /tot pipelined: DEPTH requests in one write, the next write once all
-- DEPTH replies are in (wrk counts the requests in the returned string).
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/tot_pipeline.lua URL -- CRED [DEPTH]
--
-- DEPTH defaults to 16.  wrk's latency figures are then per batch: from the
-- write of the DEPTH requests to the last of their replies.

init = function(args)
   local path = "/tot?cred=" .. (args[1] or "bench-0")
   local depth = tonumber(args[2] or "16")
   local reqs = {}
   for i = 1, depth do
      reqs[i] = wrk.format("GET", path)
   end
   batch = table.concat(reqs)
end

request = function()
   return batch
end
