"""The markdown table and the PNG chart of a bench run."""
import json
from pathlib import Path


def write_json(folder, name, data):
    path = Path(folder) / f"{name}.json"
    path.write_text(json.dumps(data, indent=2, default=str) + "\n")
    return path


def table(results, header):
    lines = [header, "", "| measure | qvd-gevent | reference (same run) | target | verdict |",
             "|---|---|---|---|---|"]
    for name, data in results.items():
        if "error" in data:
            lines.append(f"| {name} | failed: {data['error']} | | | NOT MEASURED |")
            continue
        for row in data.get("rows", []):
            lines.append("| " + " | ".join(str(cell).replace("|", "/") for cell in row) + " |")
    return "\n".join(lines) + "\n"


def _runs(values):
    """(median, min, max) of the runs' figures."""
    values = sorted(v for v in values if v is not None)
    if not values:
        return (0.0, 0.0, 0.0)
    mid = len(values) // 2
    median = values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2
    return (median, values[0], values[-1])


def _goals():
    """The goals of the table's verdicts (bench/scenarios.py), drawn as dashed lines."""
    from . import scenarios as s
    return {"bulk": s.BULK_GOAL, "relay": s.RELAY_GOAL, "handshake": s.HANDSHAKE_GOAL,
            "connect_users": s.CONNECT_USERS, "connect_p99_ms": s.CONNECT_P99_MS,
            "connect_node_ms": s.CONNECT_NODE_MS, "connect_pg_ms": s.CONNECT_PG_MS}


def chart(results, path):
    """bench.png: one panel per measure, every axis from zero; a bar is the median of the
    runs, its whisker the lowest and highest run (the spread on the shared machine), its
    label the median as the table gives it; a dashed red line is the goal (against HAProxy:
    its median times the goal's factor)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    target = _goals()
    panels = []
    if "bulk" in results and "paths" in results["bulk"]:
        p = results["bulk"]["paths"]
        values = [_runs([r.get("mb_per_proxy_cpu_s") for r in p[k]["runs"]]) for k in ("l7r", "haproxy")]
        panels.append(("bulk: MB per proxy CPU-second\n(median of %d runs, min-max; higher is better)"
                       % len(p["l7r"]["runs"]), ["L7R", "HAProxy"], values, [target["bulk"] * values[1][0], None]))
        panels.append(("bulk: MB/s at the sender\n(median, min-max; higher is better)", ["L7R", "HAProxy", "direct"],
                       [_runs([r["mb_s"] for r in p[k]["runs"]]) for k in ("l7r", "haproxy", "direct")]))
    if "relay" in results and "paths" in results["relay"]:
        p = results["relay"]["paths"]
        values = [_runs([r["us_cpu_per_message"] for r in p[k]["runs"]]) for k in ("l7r", "haproxy")]
        panels.append(("relay: µs proxy CPU per relayed 1 KiB message\n(median, min-max; lower is better)",
                       ["L7R", "HAProxy"], values, [target["relay"] * values[1][0], None]))
    if "handshake" in results and "paths" in results["handshake"]:
        p = results["handshake"]["paths"]
        values = [_runs([r["per_cpu_s"] for r in p[k].get("runs", [p[k]])]) for k in ("l7r", "haproxy")]
        panels.append(("full TLS handshakes per proxy CPU-second\n(median, min-max; higher is better)",
                       ["L7R (+ ping)", "HAProxy"], values, [target["handshake"] * values[1][0], None]))
    if "workers" in results and "by_workers" in results["workers"]:
        w = results["workers"]["by_workers"]
        counts = sorted(w, key=int)
        panels.append(("handshakes per second (wall)\nby L7R workers (median, min-max)",
                       [f"{n} worker{'s' if int(n) > 1 else ''}" for n in counts],
                       [_runs([r["per_s"] for r in w[n]["handshake"]]) for n in counts]))
        panels.append(("relay round trips per second (wall)\nby L7R workers (median, min-max)",
                       [f"{n} worker{'s' if int(n) > 1 else ''}" for n in counts],
                       [_runs([r["round_trips_per_s"] for r in w[n]["relay"]]) for n in counts]))
    if "idle" in results and "paths" in results["idle"]:
        p = results["idle"]["paths"]
        panels.append(("idle sessions: KB RSS per session\n(lower is better)", None,
                       {k: ([pt["sessions"] for pt in p[k]["points"]],
                            [pt["bytes_per_session"] / 1024 for pt in p[k]["points"]]) for k in ("l7r", "haproxy")}))
    if "browser" in results and "kinds" in results["browser"]:
        k = results["browser"]["kinds"]
        panels.append((f"idle KB RSS per session, {k['browser']['sessions']} of each held\n(lower is better)",
                       ["native", "browser"],
                       [k["native"]["bytes_per_session"] / 1024, k["browser"]["bytes_per_session"] / 1024]))
    if "connect" in results and "p50_ms" in results["connect"]:
        c = results["connect"]
        full = c["users"] == target["connect_users"]
        panels.append((f"connect_to_vm latency, ms\n({c['users']} users; lower is better)", ["p50", "p99"],
                       [c["p50_ms"], c["p99_ms"]], [None, target["connect_p99_ms"] if full else None]))
        if c.get("node_cpu_ms_per_connect") is not None:
            panels.append(("connect_to_vm: CPU per connect, ms\n(lower is better)", ["node", "PostgreSQL"],
                           [c["node_cpu_ms_per_connect"], c["postgres_cpu_ms_per_connect"]],
                           [target["connect_node_ms"], target["connect_pg_ms"]]))
    if "cold" in results and "median_connect_s" in results["cold"]:
        c = results["cold"]
        panels.append(("cold start, ms (medians)", ["connect->101", "VM own start", "node overhead"],
                       [c["median_connect_s"] * 1000, c["median_vm_start_s"] * 1000, c["overhead_ms"]]))
    if "tlslib" in results and "libs" in results["tlslib"]:
        libs = results["tlslib"]["libs"]
        panels.append(("TLS library: full handshakes + GET per server\nCPU-second (median, min-max; higher is "
                       "better)", ["stdlib ssl", "pyOpenSSL"],
                       [_runs([r["per_cpu_s"] for r in libs[k]["handshake"]]) for k in ("ssl", "pyopenssl")]))
        top = [run[-1] for run in libs["ssl"]["idle"]]
        if top:
            panels.append((f"TLS library: KB RSS per idle TLS connection\nat {top[0]['sessions']} held (median, "
                           "min-max; lower is better)", ["stdlib ssl", "pyOpenSSL"],
                           [_runs([run[-1]["bytes_per_session"] / 1024 for run in libs[k]["idle"]])
                            for k in ("ssl", "pyopenssl")]))
    if "hkd" in results and "cpu_percent" in results["hkd"]:
        h = results["hkd"]
        panels.append((f"HKD CPU, % of a core\n({h['vms']} idle VMs)", ["HKD"], [h["cpu_percent"]]))
    if "cluster" in results and "levels" in results["cluster"]:
        levels = results["cluster"]["levels"]
        panels.append(("PostgreSQL ms CPU per node-minute, idle\n(lower is better)",
                       [f"{lv['nodes']} nodes" for lv in levels],
                       [lv["idle"]["pg_cpu_ms_per_node_min"] for lv in levels]))
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.9 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        title, labels, values = panel[:3]
        goals = panel[3] if len(panel) > 3 else ()
        ax.set_title(title, fontsize=9)
        if isinstance(values, dict):
            for name, (xs, ys) in values.items():
                ax.plot(xs, ys, marker="o", label="L7R" if name == "l7r" else "HAProxy")
                for x, y in zip(xs, ys):
                    ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(0, 4), fontsize=7,
                                ha="center")
            ax.set_xlabel("sessions held")
            ax.set_xlim(left=0)
            ax.legend(fontsize=8)
        else:
            spread = [v for v in values if isinstance(v, tuple)]
            heights = [v[0] if isinstance(v, tuple) else v for v in values]
            bars = ax.bar(labels, heights, color=["tab:blue", "tab:orange", "tab:green"][:len(values)])
            if spread:
                low = [h - (v[1] if isinstance(v, tuple) else h) for h, v in zip(heights, values)]
                high = [(v[2] if isinstance(v, tuple) else h) - h for h, v in zip(heights, values)]
                ax.errorbar(range(len(values)), heights, yerr=[low, high], fmt="none", ecolor="black", capsize=4,
                            linewidth=1)
            fmt = "%.1f" if max(heights, default=0) < 100 else "%.0f"
            ax.bar_label(bars, fmt=fmt, fontsize=8, label_type="center", color="white")
            marked = False
            for i, goal in enumerate(goals):
                if goal:
                    ax.hlines(goal, i - 0.45, i + 0.45, colors="red", linestyles="dashed", linewidth=1.2,
                              label=None if marked else "goal")
                    marked = True
            if marked:
                ax.legend(fontsize=7, loc="upper right")
        ax.set_ylim(bottom=0)
        ax.tick_params(labelsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
