-- PATCH /mod pipelined: DEPTH durable charges in one write, over the funded
-- credentials PREFIX0 .. PREFIX(N-1) in turn, `by=-1&min=0`; the next write
-- once all DEPTH replies are in (wrk counts the requests in the string).
--
--   wrk -t1 -c64 -d5s --latency -s bench/wrk/mod_pipeline.lua URL -- PREFIX N [DEPTH]
--
-- The N batches (batch i starts at credential i) are formatted once, in
-- init; `request` only picks the next.  wrk's latency figures are then per
-- batch: from the write of the DEPTH requests to the last of their replies.

init = function(args)
   local prefix = args[1] or "bench-"
   local n = tonumber(args[2] or "1000")
   local depth = tonumber(args[3] or "16")
   local reqs = {}
   for i = 1, n do
      reqs[i] = wrk.format("PATCH", "/mod?cred=" .. prefix .. (i - 1) .. "&by=-1&min=0")
   end
   batches = {}
   for i = 1, n do
      local batch = {}
      for j = 0, depth - 1 do
         batch[j + 1] = reqs[(i - 1 + j) % n + 1]
      end
      batches[i] = table.concat(batch)
   end
   count = n
   turn = 0
end

request = function()
   turn = turn % count + 1
   return batches[turn]
end
