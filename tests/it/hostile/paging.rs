//! Extreme page sizes and forged page tokens.

use super::*;

/// Page sizes over the maximum (and -1, ten bytes on the wire, read as
/// 2^32-1 in a uint32) are clamped, so one page holds every agent of a
/// small fleet; page size 1 walks it without repeats; page tokens the
/// server did not issue get INVALID_ARGUMENT naming `page_token`;
/// well-formed tokens of positions that do not exist give empty pages.
#[tokio::test]
pub(super) async fn extreme_page_sizes_and_forged_page_tokens() {
    let (server, mut client, bystanders, target) = hostile_setup().await;
    let id = target.agent_id.clone();
    let mut checks = Checks::default();
    let mut raw = RawClient::new(common::channel(&server.url()).await);
    let all = list_all_ids(&mut client).await;
    let count = target.history_count as usize;

    for page_size in [u32::MAX, 1001, 1 << 31] {
        let what = format!("ListAgents page_size {page_size}");
        let request = pb::ListAgentsRequest {
            page_size,
            ..Default::default()
        };
        let answer = timed(&what, client.list_agents(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let page = page.into_inner();
            let ids: BTreeSet<String> = page.agents.into_iter().map(|a| a.agent_id).collect();
            let complete = ids == all && page.next_page_token.is_empty();
            checks.check(&what, complete, "not every agent on one page");
        }
    }
    let minus_one = Wire::new().uint(4, u64::MAX).into_bytes();
    match timed(
        "ListAgents page_size -1",
        raw.unary("ListAgents", minus_one),
    )
    .await
    {
        Ok(bytes) => {
            let page = pb::ListAgentsResponse::decode(bytes).expect("a ListAgents response");
            let n = page.agents.len();
            checks.check(
                "ListAgents page_size -1",
                n == all.len(),
                format!("{n} agents"),
            );
        }
        Err(status) => checks
            .0
            .push(format!("ListAgents page_size -1: {status:?}")),
    }
    let mut paged = BTreeSet::new();
    let mut token = String::new();
    for _ in 0..=all.len() {
        let request = pb::ListAgentsRequest {
            page_size: 1,
            page_token: token.clone(),
            ..Default::default()
        };
        let answer = timed("ListAgents page_size 1", client.list_agents(request)).await;
        let Some(page) = checks.code("ListAgents page_size 1", answer, Code::Ok) else {
            break;
        };
        let page = page.into_inner();
        let n = page.agents.len();
        checks.check("ListAgents page_size 1", n <= 1, format!("{n} agents"));
        for agent in page.agents {
            checks.check(
                "ListAgents page_size 1",
                paged.insert(agent.agent_id),
                "listed twice",
            );
        }
        token = page.next_page_token;
        if token.is_empty() {
            break;
        }
    }
    checks.check(
        "ListAgents page by page",
        paged == all,
        "another set of agents",
    );

    for (limit, page_size) in [(u32::MAX, u32::MAX), (0, u32::MAX), (u32::MAX, 0)] {
        let what = format!("GetAgentHistory limit {limit} page_size {page_size}");
        let request = pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            limit,
            page_size,
            page_token: String::new(),
        };
        let answer = timed(&what, client.get_agent_history(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let page = page.into_inner();
            let n = page.transitions.len();
            let complete = n == count && page.next_page_token.is_empty();
            checks.check(&what, complete, format!("{n} transitions"));
        }
    }
    let minus_one = Wire::new()
        .bytes(1, id.as_bytes())
        .uint(2, u64::MAX)
        .uint(3, u64::MAX)
        .into_bytes();
    let what = "GetAgentHistory limit and page_size -1";
    match timed(what, raw.unary("GetAgentHistory", minus_one)).await {
        Ok(bytes) => {
            let page = pb::GetAgentHistoryResponse::decode(bytes).expect("a history response");
            let n = page.transitions.len();
            checks.check(what, n == count, format!("{n} transitions"));
        }
        Err(status) => checks.0.push(format!("{what}: {status:?}")),
    }

    let mut calls: Vec<(String, Call, &str)> = Vec::new();
    let list_tokens = [
        "garbage".to_string(),
        "agents.v1.".into(),
        format!("agents.v1.{}", "z".repeat(32)),
        format!("agents.v1.{}", "0".repeat(31)),
        format!("agents.v1.{}", "0".repeat(33)),
        format!("agents.v1.-{}", "0".repeat(31)),
        "history.v1.0.1".into(),
        "a".repeat(100_000),
    ];
    for token in list_tokens {
        let what = format!("ListAgents with token {:?}", truncated(&token));
        let call = rpc!(client.list_agents(pb::ListAgentsRequest {
            page_token: token,
            ..Default::default()
        }));
        calls.push((what, call, "page_token"));
    }
    let history_tokens = [
        "garbage".to_string(),
        "history.v1.".into(),
        "history.v1.1".into(),
        "history.v1.2.1".into(),
        "history.v1.zz.1".into(),
        "history.v1.1.2.3".into(),
        "history.v1.10000000000000000.1".into(),
        format!("agents.v1.{}", "0".repeat(32)),
        "h".repeat(100_000),
    ];
    for token in history_tokens {
        let what = format!("GetAgentHistory with token {:?}", truncated(&token));
        let call = rpc!(client.get_agent_history(pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            page_token: token,
            ..Default::default()
        }));
        calls.push((what, call, "page_token"));
    }
    expect_invalid(&mut checks, calls).await;

    let what = "ListAgents after the largest id";
    let request = pb::ListAgentsRequest {
        page_token: format!("agents.v1.{}", "f".repeat(32)),
        ..Default::default()
    };
    let answer = timed(what, client.list_agents(request)).await;
    if let Some(page) = checks.code(what, answer, Code::Ok) {
        let page = page.into_inner();
        let empty = page.agents.is_empty() && page.next_page_token.is_empty();
        checks.check(what, empty, "not an empty last page");
    }
    for token in [
        "history.v1.0.ffffffffffffffff",
        "history.v1.ffffffffffffffff.ffffffffffffffff",
    ] {
        let what = format!("GetAgentHistory with token {token}");
        let request = pb::GetAgentHistoryRequest {
            agent_id: id.clone(),
            page_token: token.into(),
            ..Default::default()
        };
        let answer = timed(&what, client.get_agent_history(request)).await;
        if let Some(page) = checks.code(&what, answer, Code::Ok) {
            let n = page.into_inner().transitions.len();
            checks.check(&what, n <= count, format!("{n} transitions"));
        }
    }
    hostile_teardown(server, &mut client, &bystanders, &target, checks).await;
}

/// Every agent, page by page.
pub(super) async fn list_all_ids(client: &mut Client) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    let mut token = String::new();
    loop {
        let page = timed(
            "ListAgents",
            client.list_agents(pb::ListAgentsRequest {
                page_token: token,
                ..Default::default()
            }),
        )
        .await
        .expect("ListAgents")
        .into_inner();
        ids.extend(page.agents.into_iter().map(|a| a.agent_id));
        if page.next_page_token.is_empty() {
            return ids;
        }
        token = page.next_page_token;
    }
}
