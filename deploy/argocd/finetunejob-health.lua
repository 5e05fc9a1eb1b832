-- Argo CD health check for finetune.dev/FineTuneJob.
-- Install it under resource.customizations.health.finetune.dev_FineTuneJob in argocd-cm (docs/gitops.md).
-- Argo CD runs it with the live object in `obj` and reads hs.status (Healthy, Progressing, Degraded, Suspended,
-- Unknown) and hs.message. Written for Lua 5.1 (gopher-lua), the dialect Argo CD embeds.
local hs = {}

-- The message of the condition of the given type whose status is "True", or nil.
local function true_condition_message(status, condition_type)
  if status.conditions == nil then
    return nil
  end
  for _, condition in ipairs(status.conditions) do
    if condition.type == condition_type and condition.status == "True" then
      return condition.message
    end
  end
  return nil
end

-- "step 120/1000 (12%), loss 1.234, ETA 1h02m" from whatever of it the status has.
local function progress_text(status)
  local parts = {}
  if status.progress ~= nil then
    if status.progress.summary ~= nil and status.progress.summary ~= "" then
      table.insert(parts, "step " .. status.progress.summary)
    elseif status.progress.step ~= nil and status.progress.totalSteps ~= nil then
      table.insert(parts, string.format("step %d/%d", status.progress.step, status.progress.totalSteps))
    end
  end
  if status.metrics ~= nil and status.metrics.loss ~= nil then
    table.insert(parts, string.format("loss %.4g", status.metrics.loss))
  end
  if status.progress ~= nil and status.progress.eta ~= nil and status.progress.eta ~= "" then
    table.insert(parts, "ETA " .. status.progress.eta)
  end
  return table.concat(parts, ", ")
end

-- "<prefix>: <detail>", or the prefix alone when there is no detail.
local function join(prefix, detail)
  if detail == nil or detail == "" then
    return prefix
  end
  return prefix .. ": " .. detail
end

local status = obj.status
if status == nil or status.phase == nil or status.phase == "" then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to pick up the job"
  return hs
end

local phase = status.phase
local generation = obj.metadata and obj.metadata.generation
local terminal = phase == "Succeeded" or phase == "Failed"
if not terminal and generation ~= nil and status.observedGeneration ~= nil
    and status.observedGeneration < generation then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to observe spec generation " .. tostring(generation)
  return hs
end

if phase == "Succeeded" then
  hs.status = "Healthy"
  local model = nil
  if status.model ~= nil then
    model = status.model.uri
  end
  if model ~= nil then
    hs.message = "Succeeded: model at " .. model
  else
    hs.message = join("Succeeded", status.message)
  end
elseif phase == "Failed" then
  hs.status = "Degraded"
  hs.message = join("Failed", status.message or true_condition_message(status, "Failed")
    or true_condition_message(status, "InvalidSpec"))
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = join("Suspended", status.message)
elseif phase == "Queued" then
  -- Waiting for Kueue to admit the gang: Argo CD shows Kueue-queued Jobs (suspended until admitted) the same way.
  hs.status = "Suspended"
  hs.message = join("Queued", true_condition_message(status, "Queued") or status.message)
elseif phase == "Running" then
  hs.status = "Progressing"
  local detail = progress_text(status)
  if detail == "" then
    detail = status.message
  end
  hs.message = join("Running", detail)
elseif phase == "Pending" then
  hs.status = "Progressing"
  hs.message = join("Pending", true_condition_message(status, "WaitingForCapacity") or status.message)
elseif phase == "Restarting" then
  hs.status = "Progressing"
  local detail = status.message
  if status.restarts ~= nil then
    detail = join(string.format("restart %d", status.restarts), status.message)
  end
  hs.message = join("Restarting", detail)
else
  hs.status = "Unknown"
  hs.message = "Unknown phase " .. tostring(phase)
end
return hs
