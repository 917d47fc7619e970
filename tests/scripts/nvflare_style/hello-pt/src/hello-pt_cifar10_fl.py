# mypy: disable-error-code="union-attr, index, arg-type, operator"
# (for mypy --strict: as NVFlare's scripts, this one uses receive()'s model without a None
# check (receive() gives None only once the job has ended, which is_running() rules out), and
# NVFlare's params_type="FULL" strings are accepted by FLModel though its hint says ParamsType.)
"""hello-pt's client, written as NVFlare's hello-pt client is (its 2.5 src script, with the
evaluation and the task branches of its current client.py).

The same calls in the same order: init, system_info()["site_name"], SummaryWriter, the
is_running/receive loop, is_submit_model, load_state_dict(input_model.params), the
received model's accuracy, is_evaluate, a plain PyTorch training loop, torch.save, and an
FLModel with the state_dict, the metrics and NUM_STEPS_CURRENT_ROUND.
Lines that differ from NVFlare's: the imports (nvflare -> fedlift; torchvision's CIFAR10
and transforms -> local_data) and the two data-loading lines (cifar10_dataset(...)
instead of CIFAR10(root=..., transform=..., download=True, train=...)).
"""

from typing import Any

import torch
from local_data import cifar10_dataset
from simple_network import SimpleNetwork
from torch import nn
from torch.optim import SGD
from torch.utils.data.dataloader import DataLoader

import fedlift.client as flare
from fedlift.client.tracking import SummaryWriter

PATH = "./cifar_net.pth"


def evaluate(net: nn.Module, data_loader: DataLoader[Any], device: torch.device) -> float:
    net.eval()
    correct = 0
    total = 0
    with torch.no_grad():
        for images, labels in data_loader:
            images, labels = images.to(device), labels.to(device)
            _, predicted = torch.max(net(images).data, 1)
            total += labels.size(0)
            correct += (predicted == labels).sum().item()
    net.train()
    return 100.0 * correct / total


def main() -> None:
    batch_size = 4
    epochs = 2
    lr = 0.01
    model = SimpleNetwork()
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    loss = nn.CrossEntropyLoss()
    optimizer = SGD(model.parameters(), lr=lr, momentum=0.9)

    flare.init()
    sys_info = flare.system_info()
    client_name = sys_info["site_name"]

    train_dataset = cifar10_dataset(train=True)
    train_loader = DataLoader(train_dataset, batch_size=batch_size, shuffle=True)
    test_dataset = cifar10_dataset(train=False)
    test_loader = DataLoader(test_dataset, batch_size=batch_size, shuffle=False)

    summary_writer = SummaryWriter()
    last_params = None
    while flare.is_running():
        input_model = flare.receive()
        print(f"site={client_name}, current_round={input_model.current_round}")

        if flare.is_submit_model():
            flare.send(flare.FLModel(params=last_params))
            continue

        model.load_state_dict(input_model.params)
        model.to(device)
        accuracy = evaluate(model, test_loader, device)

        if flare.is_evaluate():
            flare.send(flare.FLModel(metrics={"accuracy": accuracy}))
            continue

        steps = epochs * len(train_loader)
        for epoch in range(epochs):
            running_loss = 0.0
            for i, batch in enumerate(train_loader):
                images, labels = batch[0].to(device), batch[1].to(device)
                optimizer.zero_grad()

                predictions = model(images)
                cost = loss(predictions, labels)
                cost.backward()
                optimizer.step()

                running_loss += cost.cpu().detach().numpy() / images.size()[0]
                if i % 100 == 0:
                    print(f"Epoch: {epoch}/{epochs}, Iteration: {i}, Loss: {running_loss / 100}")
                    global_step = input_model.current_round * steps + epoch * len(train_loader) + i
                    summary_writer.add_scalar(
                        tag="loss_for_each_batch", scalar=running_loss, global_step=global_step
                    )
                    running_loss = 0.0

        print("Finished Training")
        torch.save(model.state_dict(), PATH)
        last_params = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}

        output_model = flare.FLModel(
            params=model.cpu().state_dict(),
            metrics={"accuracy": accuracy},
            meta={"NUM_STEPS_CURRENT_ROUND": steps},
        )
        flare.send(output_model)


if __name__ == "__main__":
    main()
