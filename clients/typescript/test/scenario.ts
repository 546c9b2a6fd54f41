/**
 * The TypeScript client under the failure scenarios of tests/it/clients.rs;
 * the same command line and output as clients/python/tests/scenario.py:
 *
 *   node dist/test/scenario.js watch --endpoints E1[,E2] [--from N | --snapshot] [--pause-after K] [--small-window]
 *   node dist/test/scenario.js transition --endpoints E --agent ID --target STATE [--request-id ID]
 *   node dist/test/scenario.js tls --endpoints https://HOST:PORT --ca FILE --token TOKEN --cert FILE --key FILE
 *
 * stdin: `until SEQ` ends the watch once an event at or past SEQ was yielded;
 * `go` resumes it after --pause-after K events. Output: `event SEQ AGENT
 * STATE` per event, `snapshot COUNT HEAD`, `paused SEQ`, then `done
 * CONNECTIONS` or `compacted OLDEST`; `ok SEQUENCE VERSION` for transition;
 * `registered ID`, `watched SEQ`, `unauthenticated`, `listed N`, `denied`
 * for tls; `error ...` (exit 1) otherwise.
 */
import { createInterface } from "node:readline";

import {
  Client,
  LifecycleError,
  PermissionDeniedError,
  SequenceCompactedError,
  UnauthenticatedError,
  type Watch,
  stateLabel,
} from "../src/index";

function say(line: string): void {
  process.stdout.write(`${line}\n`);
}

function flags(argv: string[]): Map<string, string> {
  const out = new Map<string, string>();
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i] as string;
    if (!arg.startsWith("--")) {
      throw new Error(`unexpected argument ${arg}`);
    }
    const next = argv[i + 1];
    if (next === undefined || next.startsWith("--")) {
      out.set(arg.slice(2), "");
    } else {
      out.set(arg.slice(2), next);
      i++;
    }
  }
  return out;
}

function required(options: Map<string, string>, name: string): string {
  const value = options.get(name);
  if (!value) {
    throw new Error(`--${name} is required`);
  }
  return value;
}

async function watch(options: Map<string, string>): Promise<void> {
  // Without this, grpc-js's stream window grows with what is read; 64 KiB keeps a paused watcher's stream backed up.
  const small = options.has("small-window") ? { "grpc-node.flow_control_window": 65535 } : {};
  const client = new Client(required(options, "endpoints"), { channelOptions: small });
  const start = options.get("from");
  const pauseAfter = options.has("pause-after") ? Number(options.get("pause-after")) : undefined;
  const w: Watch = client.watch({
    startSequence: start === undefined ? undefined : Number(start),
    snapshot: options.has("snapshot"),
    idleTimeoutMs: Number(options.get("idle-timeout") ?? 60) * 1000,
  });
  let until: number | undefined;
  let last = 0;
  let resume: (() => void) | undefined;
  const lines = createInterface({ input: process.stdin });
  lines.on("line", (line) => {
    const [command, value] = line.trim().split(/\s+/);
    if (command === "until") {
      until = Number(value);
      if (last >= until) {
        w.close();
      }
    } else if (command === "go") {
      resume?.();
    }
  });
  try {
    if (options.has("snapshot")) {
      const agents = await w.snapshot();
      say(`snapshot ${agents.length} ${w.snapshotHead}`);
    }
    let count = 0;
    let connections = 0;
    for await (const event of w) {
      if (w.connections !== connections) {
        connections = w.connections;
        say(`connection ${connections}`);
      }
      say(`event ${event.sequence} ${event.agentId} ${stateLabel(event.transition?.toState ?? 0)}`);
      count++;
      last = event.sequence;
      if (until !== undefined && last >= until) {
        break;
      }
      if (pauseAfter !== undefined && count === pauseAfter) {
        say(`paused ${event.sequence}`);
        await new Promise<void>((resolve) => {
          resume = resolve;
        });
      }
    }
    say(`done ${w.connections}`);
  } catch (error) {
    if (error instanceof SequenceCompactedError) {
      say(`compacted ${error.oldestAvailableSequence}`);
    } else {
      throw error;
    }
  } finally {
    lines.close();
    client.close();
  }
}

async function transition(options: Map<string, string>): Promise<void> {
  const client = new Client(required(options, "endpoints"));
  try {
    const change = await client.transitionAgent(required(options, "agent"), required(options, "target"), {
      requestId: options.get("request-id"),
      reason: "scenario",
    });
    const last = change.transitions[change.transitions.length - 1];
    say(`ok ${last?.sequence} ${last?.version}`);
  } finally {
    client.close();
  }
}

async function tls(options: Map<string, string>): Promise<void> {
  const endpoints = required(options, "endpoints");
  const caFile = required(options, "ca");
  const client = new Client(endpoints, { token: required(options, "token"), tls: { caFile } });
  const change = await client.registerAgent({ name: "over-tls" });
  say(`registered ${change.agent.agentId}`);
  const watch = client.watch({ startSequence: change.transitions[0]?.sequence, agentIds: [change.agent.agentId] });
  for await (const event of watch) {
    say(`watched ${event.sequence}`);
    break;
  }
  client.close();
  const anonymous = new Client(endpoints, { tls: { caFile } });
  try {
    await anonymous.getLifecycleMetrics();
  } catch (error) {
    if (error instanceof UnauthenticatedError) {
      say("unauthenticated");
    }
  }
  anonymous.close();
  const viewer = new Client(endpoints, {
    tls: { caFile, clientCertFile: required(options, "cert"), clientKeyFile: required(options, "key") },
  });
  say(`listed ${(await viewer.listAgents()).length}`);
  try {
    await viewer.registerAgent();
  } catch (error) {
    if (error instanceof PermissionDeniedError) {
      say("denied");
    }
  }
  viewer.close();
}

async function main(): Promise<number> {
  const [command, ...rest] = process.argv.slice(2);
  const options = flags(rest);
  try {
    if (command === "watch") {
      await watch(options);
    } else if (command === "transition") {
      await transition(options);
    } else if (command === "tls") {
      await tls(options);
    } else {
      throw new Error(`unknown command ${command}`);
    }
  } catch (error) {
    say(`error ${error instanceof LifecycleError ? error.message : String(error)}`);
    return 1;
  }
  return 0;
}

main().then((code) => process.exit(code));
