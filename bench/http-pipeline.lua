-- bench/http-pipeline.lua: wrk sends DEPTH GET requests for the URL's path in one write and waits
-- for all DEPTH responses before the next write (HTTP/1.1 pipelining, as TechEmpower's plaintext
-- test does). wrk counts every response it parses, so its Requests/sec are responses per second.
-- Usage: wrk -s bench/http-pipeline.lua http://127.0.0.1:PORT/PATH -- [DEPTH]   (DEPTH 16 by default)

local batch

function init(args)
   local depth = tonumber(args[1]) or 16
   local requests = {}
   for i = 1, depth do
      requests[i] = wrk.format("GET", wrk.path)
   end
   batch = table.concat(requests)
end

function request()
   return batch
end
