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


def chart(results, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = []
    if "bulk" in results and "paths" in results["bulk"]:
        p = results["bulk"]["paths"]
        panels.append(("bulk MB/s (higher is better)", ["L7R", "HAProxy", "direct"],
                       [p["l7r"]["mb_s"], p["haproxy"]["mb_s"], p["direct"]["mb_s"]]))
    if "relay" in results and "paths" in results["relay"]:
        p = results["relay"]["paths"]
        panels.append(("relay µs CPU/message (lower is better)", ["L7R", "HAProxy"],
                       [p["l7r"]["us_cpu_per_message"], p["haproxy"]["us_cpu_per_message"]]))
    if "handshake" in results and "paths" in results["handshake"]:
        p = results["handshake"]["paths"]
        panels.append(("TLS handshakes / CPU-second (higher is better)", ["L7R", "HAProxy"],
                       [p["l7r"]["per_cpu_s"], p["haproxy"]["per_cpu_s"]]))
    if "idle" in results and "paths" in results["idle"]:
        p = results["idle"]["paths"]
        panels.append(("idle KB RSS/session (lower is better)", None,
                       {k: ([pt["sessions"] for pt in p[k]["points"]],
                            [pt["bytes_per_session"] / 1024 for pt in p[k]["points"]]) for k in ("l7r", "haproxy")}))
    if "browser" in results and "kinds" in results["browser"]:
        k = results["browser"]["kinds"]
        panels.append((f"idle KB RSS/session, {k['browser']['sessions']} of each held (lower is better)",
                       ["native", "browser"],
                       [k["native"]["bytes_per_session"] / 1024, k["browser"]["bytes_per_session"] / 1024]))
    if "connect" in results and "p50_ms" in results["connect"]:
        c = results["connect"]
        panels.append((f"connect_to_vm latency ms ({c['users']} users)", ["p50", "p99"], [c["p50_ms"], c["p99_ms"]]))
    if "cold" in results and "median_connect_s" in results["cold"]:
        c = results["cold"]
        panels.append(("cold start ms", ["connect->101", "VM own start", "node overhead"],
                       [c["median_connect_s"] * 1000, c["median_vm_start_s"] * 1000, c["overhead_ms"]]))
    if "hkd" in results and "cpu_percent" in results["hkd"]:
        h = results["hkd"]
        panels.append((f"HKD CPU % of a core, {h['vms']} idle VMs", ["HKD"], [h["cpu_percent"]]))
    if "cluster" in results and "levels" in results["cluster"]:
        levels = results["cluster"]["levels"]
        panels.append(("PostgreSQL ms CPU per node-minute, idle (lower is better)",
                       [f"{lv['nodes']} nodes" for lv in levels],
                       [lv["idle"]["pg_cpu_ms_per_node_min"] for lv in levels]))
    if not panels:
        return None
    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, labels, values) in zip(axes.flat, panels):
        ax.set_title(title, fontsize=9)
        if isinstance(values, dict):
            for name, (xs, ys) in values.items():
                ax.plot(xs, ys, marker="o", label="L7R" if name == "l7r" else "HAProxy")
            ax.set_xlabel("sessions held")
            ax.legend(fontsize=8)
        else:
            bars = ax.bar(labels, values, color=["tab:blue", "tab:orange", "tab:green"][:len(values)])
            ax.bar_label(bars, fmt="%.0f", fontsize=8)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
