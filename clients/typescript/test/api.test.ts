/**
 * The TypeScript client's surface against a live server (tests/it/clients/api.rs):
 *
 *   AGENT_LIFECYCLE_TEST_SERVER=HOST:PORT node --test dist/test/api.test.js
 *
 * With AGENT_LIFECYCLE_TEST_RATE_LIMITED=1, the server's [limits] allow 5
 * transitions per agent per second and only the rate-limit tests run.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, describe, test } from "node:test";

import {
  AgentState,
  Client,
  InvalidArgumentError,
  NotFoundError,
  RateLimitedError,
  RequestIdReusedError,
  SequenceNotYetWrittenError,
  TransitionNotAllowedError,
  VersionMismatchError,
  stateLabel,
} from "../src/index";

const server = process.env["AGENT_LIFECYCLE_TEST_SERVER"];
if (!server) {
  throw new Error("set AGENT_LIFECYCLE_TEST_SERVER=HOST:PORT");
}
const rateLimited = process.env["AGENT_LIFECYCLE_TEST_RATE_LIMITED"] === "1";
const client = new Client(server);
after(() => client.close());

describe("the client", { skip: rateLimited }, () => {
  const team = `api-${randomUUID().slice(0, 8)}`;
  const agentId = randomUUID();

  test("a lifecycle through every mutating method", async () => {
    const first = await client.registerAgent({ agentId, name: "api", labels: { team }, metadata: { k: [1, "a"] } });
    assert.equal(first.agent.state, AgentState.REGISTERED);
    assert.equal(first.transitions.length, 1);
    const again = await client.registerAgent({ agentId, name: "api", labels: { team } });
    assert.deepEqual(again.transitions, []);
    const deployed = await client.deployAgent(agentId, { reason: "ship" });
    assert.deepEqual(deployed.transitions.map((t) => t.toState), [AgentState.DEPLOYING, AgentState.DEPLOYED]);
    assert.equal((await client.startAgent(agentId)).agent.state, AgentState.ONLINE);
    assert.equal((await client.assignTask(agentId, "t-1")).agent.state, AgentState.BUSY);
    assert.equal((await client.completeTask(agentId, "t-1")).agent.state, AgentState.IDLE);
    assert.equal((await client.handleError(agentId, "boom")).agent.state, AgentState.ERROR);
    assert.equal((await client.putInMaintenance(agentId, { reason: "patch" })).agent.state, AgentState.MAINTENANCE);
    assert.equal((await client.resumeFromMaintenance(agentId)).agent.state, AgentState.ONLINE);
    const idle = await client.transitionAgent(agentId, "idle", { expectedVersion: 10 });
    assert.equal(idle.agent.version, 11);
  });

  test("a refused transition names the allowed targets", async () => {
    const rules = await client.getTransitionRules();
    await assert.rejects(client.transitionAgent(agentId, AgentState.REGISTERED), (e: unknown) => {
      assert.ok(e instanceof TransitionNotAllowedError);
      assert.equal(e.reason, "TRANSITION_NOT_ALLOWED");
      assert.equal(e.currentState, AgentState.IDLE);
      assert.deepEqual(e.allowedTargets, rules.get(AgentState.IDLE));
      assert.equal(e.preconditionViolations[0]?.type, "STATE");
      return true;
    });
    await assert.rejects(client.completeTask(agentId), (e: unknown) => {
      assert.ok(e instanceof TransitionNotAllowedError);
      assert.deepEqual(e.requiredStates, [AgentState.BUSY]);
      return true;
    });
  });

  test("typed errors: version mismatch, not found, invalid argument", async () => {
    await assert.rejects(client.transitionAgent(agentId, "online", { expectedVersion: 1 }), (e: unknown) => {
      assert.ok(e instanceof VersionMismatchError);
      assert.equal(e.expectedVersion, 1);
      assert.equal(e.actualVersion, 11);
      return true;
    });
    await assert.rejects(client.getAgent(randomUUID()), NotFoundError);
    await assert.rejects(client.getAgent("not-a-uuid"), (e: unknown) => {
      assert.ok(e instanceof InvalidArgumentError);
      assert.equal(e.field, "agent_id");
      return true;
    });
    await assert.rejects(client.transitionAgent(agentId, "flying"), RangeError);
  });

  test("a request id sent twice applies once; other content is refused", async () => {
    const requestId = randomUUID();
    const one = await client.transitionAgent(agentId, "busy", { requestId });
    const two = await client.transitionAgent(agentId, "busy", { requestId });
    assert.equal(one.transitions[0]?.sequence, two.transitions[0]?.sequence);
    await assert.rejects(client.transitionAgent(agentId, "idle", { requestId }), RequestIdReusedError);
    assert.equal((await client.getAgentHistory(agentId)).length, 12);
  });

  test("queries and reads as of a point", async () => {
    const listed = await client.listAgents({ labels: { team } });
    assert.deepEqual(listed.map((a) => a.agentId), [agentId]);
    assert.deepEqual(await client.listAgents({ labels: { team }, category: "error" }), []);
    const history = await client.getAgentHistory(agentId);
    const registeredAt = history[0]?.sequence ?? 0;
    assert.equal((await client.getAgent(agentId, { asOf: registeredAt })).state, AgentState.REGISTERED);
    const past = await client.listAgents({ labels: { team }, asOf: new Date() });
    assert.deepEqual(past.map((a) => stateLabel(a.state)), ["busy"]);
    const metrics = await client.getLifecycleMetrics({ asOf: registeredAt });
    assert.equal(metrics.headSequence, registeredAt);
    const head = (await client.getLifecycleMetrics()).headSequence;
    await assert.rejects(client.getAgent(agentId, { asOf: head + 100 }), SequenceNotYetWrittenError);
    assert.equal((await client.listTransitions({ agentId, pageSize: 3 })).transitions.length, 3);
    assert.equal((await client.getFleetAnalytics({ labels: { team } })).agents, 1);
    assert.equal((await client.heartbeat(agentId, { load: 0.5 })).agentId, agentId);
    assert.equal(await client.heartbeatStream([{ agentId, load: 0.1, currentTask: "" }]), 1);
  });

  test("watches: replay, snapshot, live, close", async () => {
    const history = await client.getAgentHistory(agentId);
    const replay = client.watch({ startSequence: history[0]?.sequence, agentIds: [agentId] });
    const seen: number[] = [];
    for await (const event of replay) {
      seen.push(event.sequence);
      if (seen.length === history.length) {
        break;
      }
    }
    assert.deepEqual(seen, history.map((t) => t.sequence));
    const snap = client.watch({ snapshot: true, labels: { team } });
    const agents = await snap.snapshot();
    assert.deepEqual(agents.map((a) => a.agentId), [agentId]);
    const live = await client.watch({ agentIds: [agentId] }).start();
    const done = await client.transitionAgent(agentId, "idle");
    const sequence = done.transitions[0]?.sequence;
    for (const w of [snap, live]) {
      for await (const event of w) {
        assert.equal(event.sequence, sequence);
        break;
      }
    }
    const closed = client.watch({ agentIds: [agentId] });
    closed.close();
    for await (const _ of closed) {
      assert.fail("a closed watch yields nothing");
    }
  });
});

describe("rate limits", { skip: !rateLimited }, () => {
  test("RateLimitedError with RetryInfo's delay, then retries that pass", async () => {
    const agentId = (await client.registerAgent()).agent.agentId;
    await client.deployAgent(agentId);
    await client.startAgent(agentId);
    const flip = async (c: Client): Promise<void> => {
      const state = (await c.getAgent(agentId)).state;
      await c.transitionAgent(agentId, state === AgentState.BUSY ? AgentState.ONLINE : AgentState.BUSY);
    };
    const once = new Client(server, { retry: { maxAttempts: 1 } });
    let refused: RateLimitedError | undefined;
    for (let i = 0; i < 20 && refused === undefined; i++) {
      try {
        await flip(once);
      } catch (e) {
        assert.ok(e instanceof RateLimitedError, String(e));
        refused = e;
      }
    }
    once.close();
    assert.ok(refused, "the limit was reached");
    assert.equal(refused.reason, "AGENT_RATE_LIMITED");
    assert.ok((refused.retryDelayMs ?? 0) > 0);
    const before = (await client.getAgent(agentId)).version;
    for (let i = 0; i < 12; i++) {
      await flip(client);
    }
    assert.equal((await client.getAgent(agentId)).version, before + 12);
  });
});
