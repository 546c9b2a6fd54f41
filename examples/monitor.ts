/**
 * A small fleet monitor: prints every agent, then follows the event stream,
 * printing each change and an ALERT line whenever an agent enters an error
 * state (ERROR, FAILED, TIMEOUT). The watch resumes by itself across server
 * restarts and dropped connections; if retention ever overtakes it, the
 * monitor starts over from a fresh snapshot.
 *
 *   cd clients/typescript && npm ci && npm run build
 *   node clients/typescript/dist/examples/monitor.js [SERVER]
 *
 * SERVER defaults to $AGENT_LIFECYCLE_SERVER, else http://127.0.0.1:50051; a
 * bearer token is read from $AGENT_LIFECYCLE_TOKEN.
 */
import { type Agent, Client, SequenceCompactedError, isErrorState, stateLabel } from "agent-lifecycle";

const name = (agent: Agent | undefined): string => `${agent?.name || "-"} (${agent?.agentId ?? "?"})`;

function alert(agent: Agent | undefined, reason: string): void {
  console.log(`ALERT ${name(agent)} is ${stateLabel(agent?.state ?? 0)}: ${reason}`);
}

async function main(): Promise<void> {
  const server = process.argv[2] ?? process.env["AGENT_LIFECYCLE_SERVER"] ?? "http://127.0.0.1:50051";
  const client = new Client(server, { token: process.env["AGENT_LIFECYCLE_TOKEN"] });
  for (;;) {
    const watch = client.watch({ snapshot: true });
    const fleet = await watch.snapshot();
    console.log(`fleet at sequence ${watch.snapshotHead}: ${fleet.length} agents`);
    for (const agent of fleet) {
      console.log(`  ${name(agent)} ${stateLabel(agent.state)}`);
      if (isErrorState(agent.state)) {
        alert(agent, agent.lastTransition?.reason ?? "");
      }
    }
    try {
      for await (const event of watch) {
        const t = event.transition;
        const before = t?.fromState ? stateLabel(t.fromState) : "new";
        console.log(`#${event.sequence} ${name(event.agent)} ${before} -> ${stateLabel(t?.toState ?? 0)}`);
        if (t !== undefined && isErrorState(t.toState)) {
          alert(event.agent, t.reason);
        }
      }
    } catch (error) {
      if (!(error instanceof SequenceCompactedError)) {
        throw error;
      }
      console.log(`fell behind retention (oldest kept: ${error.oldestAvailableSequence}); new snapshot`);
    }
  }
}

main().catch((error) => {
  console.error(String(error));
  process.exit(1);
});
